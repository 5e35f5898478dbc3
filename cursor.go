package main

// The keyset cursor: a listing's position, the sort key and id of the last
// product of a page, encoded opaquely for clients. The store makes it (a
// page's next_cursor); the query parser reads it back.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/url"
)

// cursor is a keyset position: the sort key and id of the last product of
// the previous page, with the normalised query the page answered. It is
// opaque to clients (base64url of a small JSON object).
type cursor struct {
	Params map[string]string // the query, as ListFilter.params
	Sort   string            // sort parameter, e.g. "-price_cents"
	Key    any               // int64 or string; nil when sorting by id
	ID     int64
}

type cursorJSON struct {
	Q map[string]string `json:"q"`
	K json.RawMessage   `json:"k,omitempty"`
	I int64             `json:"i"`
}

func cursorAfter(f ListFilter, p Product) cursor {
	c := cursor{Params: f.params(), Sort: f.sortParam(), ID: p.ID}
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

// encode writes c without HTML escaping ("<" stays one byte), which keeps
// the longest cursor within maxCursorLen.
func (c cursor) encode() string {
	cj := cursorJSON{Q: c.Params, I: c.ID}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if c.Key != nil {
		enc.Encode(c.Key)
		cj.K = bytes.TrimSpace(b.Bytes())
		b = bytes.Buffer{}
		enc = json.NewEncoder(&b)
		enc.SetEscapeHTML(false)
	}
	enc.Encode(cj) // maps of strings, a raw value, an int: cannot fail
	return base64.RawURLEncoding.EncodeToString(bytes.TrimSpace(b.Bytes()))
}

// maxCursorLen bounds the cursors decodeCursor reads. The longest cursor
// the service makes carries a 200-rune name key and the longest query (a
// 64-rune category, 200 runes of q, both prices, in_stock): about 3,300
// bytes when every character is one JSON escapes to 6 bytes (U+2028) or a
// 4-byte letter. TestCursor_longest builds it.
const maxCursorLen = 4096

type cursorError string

func (e cursorError) Error() string { return string(e) }

// decodeCursor parses s and returns it with the filter of the query it was
// made for. The query is checked as strictly as one in a URL: a cursor is
// client input.
func decodeCursor(s string) (cursor, ListFilter, error) {
	const bad = cursorError("is not a valid cursor")
	if len(s) > maxCursorLen {
		return cursor{}, ListFilter{}, bad
	}
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return cursor{}, ListFilter{}, bad
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var cj cursorJSON
	if err := dec.Decode(&cj); err != nil || dec.More() || cj.I < 0 || cj.Q == nil {
		return cursor{}, ListFilter{}, bad
	}
	values := make(url.Values, len(cj.Q))
	for k, v := range cj.Q {
		values[k] = []string{v}
	}
	problems := make(map[string]string)
	f := parseListValues(values, problems)
	if len(problems) > 0 {
		return cursor{}, ListFilter{}, bad
	}
	c := cursor{Params: f.params(), Sort: f.sortParam(), ID: cj.I}
	switch f.Sort {
	case "id":
		if cj.K != nil {
			return cursor{}, ListFilter{}, bad
		}
	case "name":
		var v string
		if err := json.Unmarshal(cj.K, &v); err != nil {
			return cursor{}, ListFilter{}, bad
		}
		c.Key = v
	case "price_cents", "created_at":
		var v int64
		if err := json.Unmarshal(cj.K, &v); err != nil {
			return cursor{}, ListFilter{}, bad
		}
		c.Key = v
	}
	return c, f, nil
}
