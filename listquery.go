package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
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
func parseListQuery(rawQuery string) (ListFilter, error) {
	f := ListFilter{Limit: defaultLimit, Sort: "id"}
	values, err := url.ParseQuery(rawQuery)
	if err != nil {
		return f, &BadRequestError{Detail: "the query string is malformed"}
	}
	problems := make(map[string]string)
	var rawCursor string
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
		case "cursor":
			rawCursor = v
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
	if rawCursor != "" && problems["sort"] == "" {
		c, err := decodeCursor(rawCursor, f.sortParam())
		if err != nil {
			problems["cursor"] = err.Error()
		} else {
			f.After = &c
		}
	}
	if len(problems) > 0 {
		return f, &BadRequestError{Detail: "invalid query parameters", Problems: problems}
	}
	return f, nil
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

// cursor is a keyset position: the sort key and id of the last product of
// the previous page. It is opaque to clients (base64url of a small JSON
// object) and bound to the sort it was made for.
type cursor struct {
	Sort string // sort parameter, e.g. "-price_cents"
	Key  any    // int64 or string; nil when sorting by id
	ID   int64
}

type cursorJSON struct {
	S string          `json:"s"`
	K json.RawMessage `json:"k,omitempty"`
	I int64           `json:"i"`
}

func cursorAfter(f ListFilter, p Product) cursor {
	c := cursor{Sort: f.sortParam(), ID: p.ID}
	switch f.Sort {
	case "name":
		c.Key = p.Name
	case "price_cents":
		c.Key = p.PriceCents
	case "created_at":
		c.Key = p.CreatedAt.UnixMicro()
	}
	return c
}

func (c cursor) encode() string {
	cj := cursorJSON{S: c.Sort, I: c.ID}
	if c.Key != nil {
		cj.K, _ = json.Marshal(c.Key)
	}
	b, _ := json.Marshal(cj)
	return base64.RawURLEncoding.EncodeToString(b)
}

// maxCursorLen bounds the cursors decodeCursor reads.
const maxCursorLen = 2048

type cursorError string

func (e cursorError) Error() string { return string(e) }

// decodeCursor parses s and checks it was made for sort.
func decodeCursor(s, sort string) (cursor, error) {
	const bad = cursorError("is not a valid cursor")
	// The longest cursor the service makes is after a 200-rune name of
	// characters that JSON escapes to 6 bytes ("<", U+2028): about 1,700
	// bytes of base64. 1024 refused the service's own cursors.
	if len(s) > maxCursorLen {
		return cursor{}, bad
	}
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return cursor{}, bad
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var cj cursorJSON
	if err := dec.Decode(&cj); err != nil || dec.More() || cj.I < 0 {
		return cursor{}, bad
	}
	if cj.S != sort {
		return cursor{}, cursorError("was made for another sort; start again without a cursor")
	}
	c := cursor{Sort: cj.S, ID: cj.I}
	key, _ := strings.CutPrefix(sort, "-")
	switch key {
	case "id":
		if cj.K != nil {
			return cursor{}, bad
		}
	case "name":
		var v string
		if err := json.Unmarshal(cj.K, &v); err != nil {
			return cursor{}, bad
		}
		c.Key = v
	case "price_cents", "created_at":
		var v int64
		if err := json.Unmarshal(cj.K, &v); err != nil {
			return cursor{}, bad
		}
		c.Key = v
	}
	return c, nil
}
