package main

import (
	"fmt"
	"maps"
	"net/url"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// sortColumns is the closed set of sort keys and the column each orders by.
var sortColumns = map[string]string{
	"id":          "id",
	"name":        "name",
	"price_cents": "price_cents",
	"created_at":  "created_at",
}

const (
	defaultLimit  = 20
	maxLimit      = 100
	maxQueryLen   = 200
	maxQueryTerms = 16
)

// parseListQuery reads the query string of GET /products. Unknown, repeated
// or invalid parameters are a *BadRequestError naming each of them: a typo
// such as "categry" must not silently return the unfiltered catalog.
//
// A cursor carries the normalised query it was made for. Sent alone it
// continues exactly that query; sent with other parameters, they must make
// the same query (the same filters, sort and limit, in any order and
// spelling that normalises alike), else the cursor is refused: a cursor
// never silently changes the query.
func parseListQuery(rawQuery string) (ListFilter, error) {
	values, err := parseQuery(rawQuery)
	if err != nil {
		return ListFilter{Limit: defaultLimit, Sort: "id"}, err
	}
	problems := make(map[string]string)
	rawCursors := values["cursor"]
	delete(values, "cursor")
	f := parseListValues(values, problems)
	switch {
	case len(rawCursors) > 1:
		problems["cursor"] = "must be given at most once"
	case len(rawCursors) == 1 && rawCursors[0] != "":
		c, cf, err := decodeCursor(rawCursors[0])
		switch {
		case err != nil:
			problems["cursor"] = err.Error()
		case len(values) > 0 && len(problems) == 0 && !maps.Equal(f.params(), cf.params()):
			problems["cursor"] = "was made for another query; send it alone, or with the same filters, sort and limit"
		default:
			f = cf
			f.After = &c
		}
	}
	if len(problems) > 0 {
		return f, &BadRequestError{Detail: "invalid query parameters", Problems: problems}
	}
	return f, nil
}

// maxQueryParams bounds the parameters of a query string. No endpoint
// reads more than eight; beyond this many, the query is refused before it
// is parsed, so thousands of parameters cost one count of '&', not a value
// and a problem each.
const maxQueryParams = 32

// parseQuery is url.ParseQuery for the service's endpoints. It returns a
// *BadRequestError for a malformed query or one of more than maxQueryParams
// parameters.
func parseQuery(rawQuery string) (url.Values, error) {
	if n := strings.Count(rawQuery, "&") + 1; n > maxQueryParams {
		return nil, &BadRequestError{Detail: fmt.Sprintf("the query string has %d parameters; at most %d are read", n, maxQueryParams)}
	}
	values, err := url.ParseQuery(rawQuery)
	if err != nil {
		return nil, &BadRequestError{Detail: "the query string is malformed"}
	}
	return values, nil
}

// parseListValues reads every listing parameter but the cursor, recording
// what is wrong with each in problems.
func parseListValues(values url.Values, problems map[string]string) ListFilter {
	f := ListFilter{Limit: defaultLimit, Sort: "id"}
	for name, vals := range values {
		if len(vals) > 1 {
			problems[name] = "must be given at most once"
			continue
		}
		v := vals[0]
		if !utf8.ValidString(v) {
			problems[name] = "must be valid UTF-8"
			continue
		}
		switch name {
		case "limit":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > maxLimit {
				problems[name] = "must be an integer from 1 to 100"
				continue
			}
			f.Limit = n
		case "category":
			if msg := validText(v, 0, maxCategoryLen, false); msg != "" {
				problems[name] = msg
				continue
			}
			f.Category = &v
		case "q":
			terms, msg := searchTerms(v)
			if msg != "" {
				problems[name] = msg
				continue
			}
			f.Terms = terms
		case "min_price_cents", "max_price_cents":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || validPrice(n) != "" {
				problems[name] = "must be an integer from 0 to 1000000000000"
				continue
			}
			if name == "min_price_cents" {
				f.MinPriceCents = &n
			} else {
				f.MaxPriceCents = &n
			}
		case "in_stock":
			b, ok := map[string]bool{"true": true, "false": false}[v]
			if !ok {
				problems[name] = "must be true or false"
				continue
			}
			f.InStock = &b
		case "sort":
			key, desc := strings.CutPrefix(v, "-")
			if _, ok := sortColumns[key]; !ok {
				problems[name] = "must be one of id, name, price_cents, created_at, optionally prefixed with '-'"
				continue
			}
			f.Sort, f.Desc = key, desc
		default:
			problems[name] = "is not a known parameter"
		}
	}
	if f.MinPriceCents != nil && f.MaxPriceCents != nil && *f.MinPriceCents > *f.MaxPriceCents {
		problems["min_price_cents"] = "must not exceed max_price_cents"
	}
	return f
}

// params is f as normalised query parameters (no cursor): what a cursor
// carries, and what two queries are compared by. Every parameter that
// parseListValues reads from it gives back f.
func (f ListFilter) params() map[string]string {
	p := map[string]string{"limit": strconv.Itoa(f.Limit), "sort": f.sortParam()}
	if f.Category != nil {
		p["category"] = *f.Category
	}
	if len(f.Terms) > 0 {
		// The words: a cursor is client input, and its q is split into
		// words again like any other.
		p["q"] = strings.Join(f.Terms, " ")
	}
	if f.MinPriceCents != nil {
		p["min_price_cents"] = strconv.FormatInt(*f.MinPriceCents, 10)
	}
	if f.MaxPriceCents != nil {
		p["max_price_cents"] = strconv.FormatInt(*f.MaxPriceCents, 10)
	}
	if f.InStock != nil {
		p["in_stock"] = strconv.FormatBool(*f.InStock)
	}
	return p
}

// sortParam is the sort as the client wrote it, e.g. "-price_cents".
func (f ListFilter) sortParam() string {
	if f.Desc {
		return "-" + f.Sort
	}
	return f.Sort
}

// searchTerms splits free text into words: each run of letters and digits
// is one. Only words reach the store, which builds its own query from them,
// so no input can be read as query syntax (NEAR, OR, column filters).
func searchTerms(q string) ([]string, string) {
	if utf8.RuneCountInString(q) > maxQueryLen {
		return nil, "must be at most 200 characters"
	}
	terms := strings.FieldsFunc(q, func(r rune) bool { return !unicode.IsLetter(r) && !unicode.IsDigit(r) })
	if len(terms) == 0 {
		return nil, "must contain at least one letter or digit"
	}
	if len(terms) > maxQueryTerms {
		return nil, "must have at most 16 words"
	}
	return terms, ""
}
