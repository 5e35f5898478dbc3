package main

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestDecodeStrict_ProductInput(t *testing.T) {
	tests := []struct {
		name      string
		body      string
		wantField string // the field the 400 names; "" for a body-level error
		wantErr   bool
	}{
		{name: "valid", body: `{"sku":"A-1","name":"pen","price_cents":150}`},
		{name: "case variant of a field", body: `{"SKU":"A-1","name":"pen","price_cents":150}`, wantErr: true, wantField: "SKU"},
		{name: "unknown field", body: `{"sku":"A-1","name":"pen","price_cents":150,"colour":"red"}`, wantErr: true, wantField: "colour"},
		{name: "duplicate key", body: `{"sku":"A-1","sku":"A-2","name":"pen","price_cents":150}`, wantErr: true, wantField: "sku"},
		{name: "trailing data", body: `{"sku":"A-1","name":"pen","price_cents":150} {}`, wantErr: true},
		{name: "float price", body: `{"sku":"A-1","name":"pen","price_cents":1.5}`, wantErr: true, wantField: "price_cents"},
		{name: "price beyond int64", body: `{"sku":"A-1","name":"pen","price_cents":1e400}`, wantErr: true},
		{name: "invalid UTF-8", body: "{\"sku\":\"A-1\",\"name\":\"p\xffn\",\"price_cents\":1}", wantErr: true},
		{name: "array", body: `[1]`, wantErr: true},
		{name: "empty", body: ``, wantErr: true},
		{name: "null member", body: `{"sku":"A-1","name":"pen","price_cents":1,"stock":null}`, wantErr: true, wantField: "stock"},
		{name: "null member with spaces", body: `{"sku":"A-1","name":"pen","price_cents":1,"currency" :  null }`, wantErr: true, wantField: "currency"},
		{name: "NaN", body: `{"sku":"A-1","name":"pen","price_cents":NaN}`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var in ProductInput
			err := decodeStrict([]byte(tt.body), &in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("decodeStrict(%s) error = %v, want error %v", tt.body, err, tt.wantErr)
			}
			if err == nil {
				return
			}
			var bad *BadRequestError
			if !errors.As(err, &bad) {
				t.Fatalf("decodeStrict(%s) error = %T, want *BadRequestError", tt.body, err)
			}
			if tt.wantField != "" && bad.Problems[tt.wantField] == "" {
				t.Errorf("decodeStrict(%s) problems = %v, want one for %q", tt.body, bad.Problems, tt.wantField)
			}
		})
	}
}

func TestAppendProduct_MatchesEncodingJSON(t *testing.T) {
	p := Product{ID: 7, SKU: "A.b_c-1", Name: "quote \" back\\slash \u2028 <tag> é 🖊", Description: "line\nnext\ttab\x01",
		Category: "", PriceCents: 1_000_000_000_000, Currency: "EUR", Stock: 0, Version: 12,
		CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC), UpdatedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	var got map[string]any
	if err := json.Unmarshal(appendProduct(nil, &p), &got); err != nil {
		t.Fatalf("appendProduct output is not JSON: %v", err)
	}
	want := map[string]any{"id": 7.0, "sku": p.SKU, "name": p.Name, "description": p.Description, "category": "",
		"price_cents": 1e12, "currency": "EUR", "stock": 0.0, "reserved": 0.0, "available": 0.0, "version": 12.0,
		"created_at": "2026-01-02T03:04:05.123456Z", "updated_at": "2026-01-02T03:04:05.000000Z"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("appendProduct mismatch (-want +got):\n%s", diff)
	}
}

// TestDecode_wrongTypeNamesTheFieldsRule: a price of 12.5 is refused with
// the rule of price_cents (0 to 10¹²), not the range of an int64.
func TestDecode_wrongTypeNamesTheFieldsRule(t *testing.T) {
	tests := []struct{ body, field, want string }{
		{`{"sku":"A","name":"x","price_cents":12.5}`, "price_cents", "must be an integer from 0 to 1000000000000"},
		{`{"sku":"A","name":"x","price_cents":1,"stock":"5"}`, "stock", "must be an integer from 0 to 1000000000000"},
	}
	for _, tt := range tests {
		var in ProductInput
		err := decodeStrict([]byte(tt.body), &in)
		bre, ok := errors.AsType[*BadRequestError](err)
		if !ok || bre.Problems[tt.field] != tt.want {
			t.Errorf("decode %s = %v, want %s %q", tt.body, err, tt.field, tt.want)
		}
	}
	if _, err := decodePatch([]byte(`{"price_cents":12.5}`)); err == nil || !strings.Contains(err.Error(), "from 0 to 1000000000000") {
		t.Errorf("patch price_cents 12.5 error = %v, want the price's rule", err)
	}
}
