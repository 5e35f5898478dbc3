package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"
)

// timeLayout is how timestamps are written: RFC 3339 in UTC with
// microseconds, the precision they are stored with.
const timeLayout = "2006-01-02T15:04:05.000000Z07:00"

// appendProduct appends p as JSON. Products are encoded on every read, so
// this is written out by hand instead of through reflection.
func appendProduct(b []byte, p *Product) []byte {
	b = append(b, `{"id":`...)
	b = strconv.AppendInt(b, p.ID, 10)
	b = append(b, `,"sku":`...)
	b = appendString(b, p.SKU)
	b = append(b, `,"name":`...)
	b = appendString(b, p.Name)
	b = append(b, `,"description":`...)
	b = appendString(b, p.Description)
	b = append(b, `,"category":`...)
	b = appendString(b, p.Category)
	b = append(b, `,"price_cents":`...)
	b = strconv.AppendInt(b, p.PriceCents, 10)
	b = append(b, `,"currency":`...)
	b = appendString(b, p.Currency)
	b = append(b, `,"stock":`...)
	b = strconv.AppendInt(b, p.Stock, 10)
	b = append(b, `,"reserved":`...)
	b = strconv.AppendInt(b, p.Reserved, 10)
	b = append(b, `,"available":`...)
	b = strconv.AppendInt(b, p.Stock-p.Reserved, 10)
	b = append(b, `,"version":`...)
	b = strconv.AppendInt(b, p.Version, 10)
	b = append(b, `,"created_at":"`...)
	b = p.CreatedAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, `","updated_at":"`...)
	b = p.UpdatedAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, `"}`...)
	return b
}

// MarshalJSON encodes p exactly as the API does.
func (p Product) MarshalJSON() ([]byte, error) { return appendProduct(nil, &p), nil }

// appendPage appends a listing page as JSON.
func appendPage(b []byte, page Page) []byte {
	b = append(b, `{"items":[`...)
	for i := range page.Items {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendProduct(b, &page.Items[i])
	}
	b = append(b, `],"next_cursor":`...)
	if page.NextCursor == "" {
		b = append(b, "null"...)
	} else {
		b = appendString(b, page.NextCursor)
	}
	return append(b, '}')
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Invalid UTF-8 becomes U+FFFD, as
// encoding/json does; U+2028 and U+2029 are escaped so the output is also
// safe inside JavaScript.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// decodeStrict decodes the JSON object in body into v, which must be a
// pointer to a struct or to a map of raw messages. It rejects what
// encoding/json would let through silently — invalid UTF-8, duplicate keys,
// unknown fields, trailing data and, for a struct, null members — with a
// *BadRequestError naming the field.
func decodeStrict(body []byte, v any) error {
	known := knownFields(v)
	return decodeChecked(body, v, known, known == nil)
}

// decodeChecked is decodeStrict with the names the object may have given
// by known (nil: any) and, when nullable, null allowed as a member's value.
func decodeChecked(body []byte, v any, known map[string]bool, nullable bool) error {
	if !utf8.Valid(body) {
		return &BadRequestError{Detail: "the body is not valid UTF-8"}
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return &BadRequestError{Detail: "the body is empty; a JSON object is required"}
	}
	if err := checkTopLevelKeys(body, known, nullable); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return &BadRequestError{Detail: "the body has data after the JSON object"}
	}
	return nil
}

// knownFields returns the JSON names of v's struct fields, or nil when v is
// not a pointer to a struct. encoding/json matches names case-insensitively
// ("SKU" fills sku); the API's names are exact.
func knownFields(v any) map[string]bool {
	t := reflect.TypeOf(v)
	if t.Kind() != reflect.Pointer || t.Elem().Kind() != reflect.Struct {
		return nil
	}
	if f, ok := fieldCache.Load(t); ok {
		return f.(map[string]bool)
	}
	fields := make(map[string]bool)
	for sf := range t.Elem().Fields() {
		name, _, _ := strings.Cut(sf.Tag.Get("json"), ",")
		if name != "" && name != "-" {
			fields[name] = true
		}
	}
	fieldCache.Store(t, fields)
	return fields
}

var fieldCache sync.Map // reflect.Type → map[string]bool

// checkTopLevelKeys makes sure body is a JSON object whose keys are unique
// and, when known is not nil, each one of the known names; and, unless
// nullable, that no member is null. Request bodies are flat objects, so the
// top level is the level that matters: a nested value fails type checks
// anyway. It scans the bytes itself rather than through json.Decoder's
// tokens, which cost more than the decoding proper.
//
// An unknown name is refused as soon as it is read, so with known names at
// most len(known) keys are ever kept, and looking through them is cheap;
// with any name allowed, keys go into a set. A body of a hundred thousand
// keys costs one pass either way.
func checkTopLevelKeys(body []byte, known map[string]bool, nullable bool) error {
	if !json.Valid(body) {
		var v any
		return jsonError(json.Unmarshal(body, &v))
	}
	i := skipSpace(body, 0)
	if body[i] != '{' {
		return &BadRequestError{Detail: "the body must be a JSON object"}
	}
	var seen [16]string
	keys := seen[:0]       // known != nil: no more than len(known)
	var set map[string]int // known == nil
	for i = skipSpace(body, i+1); body[i] != '}'; i = skipSpace(body, i+1) {
		end := stringEnd(body, i)
		key := string(body[i+1 : end-1])
		if bytes.IndexByte(body[i:end], '\\') >= 0 {
			json.Unmarshal(body[i:end], &key) // valid JSON: cannot fail
		}
		if known != nil && !known[key] {
			return badParam(key, "is not a known field")
		}
		if known != nil {
			if slices.Contains(keys, key) {
				return badParam(key, "appears more than once")
			}
			keys = append(keys, key)
		} else {
			if set == nil {
				set = make(map[string]int)
			}
			if set[key]++; set[key] > 1 {
				return badParam(key, "appears more than once")
			}
		}
		i = skipSpace(body, skipSpace(body, end)+1) // past ':'
		// POST, PUT and stock bodies type every field plainly (a string, an
		// integer): null is a wrong type there, not "the default", which is
		// what leaving the field out means. encoding/json would read it as
		// the zero value. Only a merge patch gives null a meaning.
		if !nullable && bytes.HasPrefix(body[i:], []byte("null")) {
			return badParam(key, "must not be null; leave the field out instead")
		}
		i = skipSpace(body, valueEnd(body, i))
		if body[i] == '}' {
			break
		}
	}
	return nil
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index after the string starting at b[i] == '"'.
func stringEnd(b []byte, i int) int {
	for i++; b[i] != '"'; i++ {
		if b[i] == '\\' {
			i++
		}
	}
	return i + 1
}

// valueEnd returns the index after the valid JSON value starting at b[i].
func valueEnd(b []byte, i int) int {
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for ; ; i++ {
			switch b[i] {
			case '"':
				i = stringEnd(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
	}
	for i < len(b) && b[i] != ',' && b[i] != '}' && b[i] != ']' && b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r' {
		i++
	}
	return i
}

// jsonError turns an encoding/json error into a *BadRequestError.
func jsonError(err error) error {
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntax):
		return &BadRequestError{Detail: fmt.Sprintf("the body is not valid JSON (at byte %d)", syntax.Offset)}
	case errors.As(err, &typ):
		if typ.Field == "" {
			return &BadRequestError{Detail: "the body must be a JSON object"}
		}
		return badParam(typ.Field, "must be "+jsonTypeName(typ.Field, typ.Type.String()))
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return &BadRequestError{Detail: "the body is not valid JSON (unexpected end)"}
	}
	if verr, ok := errors.AsType[*ValidationError](err); ok {
		return verr // from a type's own UnmarshalJSON, such as reservationLines
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		name, _ = strconv.Unquote(name)
		return badParam(name, "is not a known field")
	}
	var bre *BadRequestError
	if errors.As(err, &bre) {
		return bre
	}
	return &BadRequestError{Detail: "the body is not valid JSON"}
}

func jsonTypeName(field, goType string) string {
	switch strings.TrimPrefix(goType, "*") {
	case "int64":
		// The field's own rule, not int64's range: a client reading the
		// message learns what it may send.
		name := field[strings.LastIndexByte(field, '.')+1:]
		if r, ok := integerRanges[name]; ok {
			return r
		}
		return "an integer"
	case "string":
		return "a string"
	}
	return "of the documented type"
}

// integerRanges are the integer fields' rules, as their validation states
// them, for a value of the wrong JSON type (12.5, "5", true).
var integerRanges = map[string]string{
	"price_cents": "an integer from 0 to 1000000000000",
	"stock":       "an integer from 0 to 1000000000000",
	"delta":       "a non-zero integer from -1000000000000 to 1000000000000",
	"quantity":    "an integer from 1 to 1000000000000",
	"product_id":  "a positive integer",
	"ttl_seconds": "an integer from 1 to 86400",
}

// decodePatch decodes a JSON merge patch (RFC 7396) of a product. Its
// names are a product's members: any other is refused as soon as it is
// read, before anything is decoded.
func decodePatch(body []byte) (ProductPatch, error) {
	var raw map[string]json.RawMessage
	if err := decodeChecked(body, &raw, knownFields(&Product{}), true); err != nil {
		return ProductPatch{}, err
	}
	var pt ProductPatch
	for name, v := range raw {
		var err error
		switch name {
		case "sku":
			pt.SKU, err = patchField[string](name, v)
		case "name":
			pt.Name, err = patchField[string](name, v)
		case "description":
			pt.Description, err = patchField[string](name, v)
		case "category":
			pt.Category, err = patchField[string](name, v)
		case "price_cents":
			pt.PriceCents, err = patchField[int64](name, v)
		case "currency":
			pt.Currency, err = patchField[string](name, v)
		case "stock":
			pt.Stock, err = patchField[int64](name, v)
		case "id", "version", "created_at", "updated_at":
			err = badParam(name, "is assigned by the service and cannot be changed")
		default:
			err = badParam(name, "is not a known field")
		}
		if err != nil {
			return ProductPatch{}, err
		}
	}
	return pt, nil
}

func patchField[T any](name string, raw json.RawMessage) (optional[T], error) {
	o := optional[T]{Set: true}
	if string(raw) == "null" {
		o.Null = true
		return o, nil
	}
	if err := json.Unmarshal(raw, &o.Value); err != nil {
		var typ *json.UnmarshalTypeError
		if errors.As(err, &typ) {
			return o, badParam(name, "must be "+jsonTypeName(name, typ.Type.String()))
		}
		return o, badParam(name, "is not valid JSON")
	}
	return o, nil
}

// appendReservation appends r as the API's JSON.
func appendReservation(b []byte, r *Reservation) []byte {
	b = append(b, `{"id":`...)
	b = appendString(b, r.ID)
	b = append(b, `,"state":`...)
	b = appendString(b, r.State)
	b = append(b, `,"reference":`...)
	b = appendString(b, r.Reference)
	b = append(b, `,"lines":[`...)
	for i, l := range r.Lines {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"product_id":`...)
		b = strconv.AppendInt(b, l.ProductID, 10)
		b = append(b, `,"quantity":`...)
		b = strconv.AppendInt(b, l.Quantity, 10)
		b = append(b, '}')
	}
	b = append(b, `],"created_at":"`...)
	b = r.CreatedAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, `","expires_at":"`...)
	b = r.ExpiresAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, `","updated_at":"`...)
	b = r.UpdatedAt.UTC().AppendFormat(b, timeLayout)
	b = append(b, '"')
	if r.CreatedBy != "" {
		b = append(b, `,"created_by":`...)
		b = appendString(b, r.CreatedBy)
	}
	return append(b, '}')
}

// reservationBody is the body of POST /reservations as read: each line is
// decoded on its own, as strictly as a body (exact names, no null, no
// unknown or repeated fields), and named by its index when it is wrong.
type reservationBody struct {
	Reference  *string          `json:"reference"`
	Lines      reservationLines `json:"lines"`
	TTLSeconds *int64           `json:"ttl_seconds"`
}

// reservationLines is the lines array, each line kept raw. It is counted
// before anything is made of it: an array of more than maxReservationLines
// is refused from its first maxReservationLines+1 elements, whatever
// follows, so a body of hundreds of thousands of lines costs a scan, not a
// value and a problem per line.
type reservationLines []json.RawMessage

// UnmarshalJSON splits a JSON array into its elements. It returns a
// *ValidationError naming lines for more than maxReservationLines of them,
// as ReservationInput.Valid would. b is valid
// JSON (checkTopLevelKeys checked the body), so the scan need not check it.
func (l *reservationLines) UnmarshalJSON(b []byte) error {
	if len(b) == 0 || b[0] != '[' {
		if string(b) == "null" {
			return nil // refused as a null member before this is called
		}
		return &json.UnmarshalTypeError{Value: "non-array", Type: reflect.TypeFor[[]reservationLineBody](), Field: "lines"}
	}
	var lines reservationLines
	for i := skipSpace(b, 1); b[i] != ']'; {
		if len(lines) == maxReservationLines {
			return &ValidationError{Problems: map[string]string{"lines": fmt.Sprintf("must have 1 to %d lines", maxReservationLines)}}
		}
		end := valueEnd(b, i)
		lines = append(lines, bytes.Clone(b[i:end]))
		if i = skipSpace(b, end); b[i] == ',' {
			i = skipSpace(b, i+1)
		}
	}
	*l = lines
	return nil
}

type reservationLineBody struct {
	ProductID *int64 `json:"product_id"`
	Quantity  *int64 `json:"quantity"`
}

// decodeReservationInput reads a POST /reservations body. It returns a
// *BadRequestError for a body that is not the expected JSON, and a
// *ValidationError for a line without a product_id or quantity.
func decodeReservationInput(body []byte) (ReservationInput, error) {
	var rb reservationBody
	if err := decodeStrict(body, &rb); err != nil {
		return ReservationInput{}, err
	}
	in := ReservationInput{Reference: rb.Reference, TTLSeconds: rb.TTLSeconds}
	missing := map[string]string{}
	for i, raw := range rb.Lines {
		name := fmt.Sprintf("lines[%d]", i)
		var lb reservationLineBody
		if err := decodeStrict(raw, &lb); err != nil {
			bad, ok := errors.AsType[*BadRequestError](err)
			if !ok {
				return ReservationInput{}, err
			}
			problems := map[string]string{}
			for k, v := range bad.Problems {
				problems[name+"."+k] = v
			}
			if len(problems) == 0 {
				problems[name] = bad.Detail
			}
			return ReservationInput{}, &BadRequestError{Detail: name + ": " + bad.Detail, Problems: problems}
		}
		if lb.ProductID == nil {
			missing[name+".product_id"] = "is required"
		}
		if lb.Quantity == nil {
			missing[name+".quantity"] = "is required"
		}
		in.Lines = append(in.Lines, ReservationLine{ProductID: deref(lb.ProductID, 0), Quantity: deref(lb.Quantity, 0)})
	}
	if len(missing) > 0 {
		return ReservationInput{}, &ValidationError{Problems: missing}
	}
	return in, nil
}
