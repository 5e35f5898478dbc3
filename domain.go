package main

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Domain errors. The handler maps each to one HTTP status in one table
// (errorStatus); everything else that goes wrong is an internal error.
var (
	ErrNotFound          = errors.New("product not found")
	ErrConflict          = errors.New("conflict")
	ErrInsufficientStock = errors.New("insufficient stock")
	ErrInvalid           = errors.New("invalid input")
	ErrPrecondition      = errors.New("precondition failed")
	ErrUnavailable       = errors.New("service unavailable")
	// ErrIdempotencyMismatch is a reused Idempotency-Key with a different request.
	ErrIdempotencyMismatch = errors.New("idempotency key reused with a different request")
	// ErrReserved is a product that cannot be deleted: open holds name it.
	ErrReserved = errors.New("product has open reservations")
	// ErrReservationNotFound is an unknown reservation id.
	ErrReservationNotFound = errors.New("reservation not found")
	// ErrInvalidState is a transition the reservation's state does not
	// allow: confirming a released reservation, or releasing a confirmed one.
	ErrInvalidState = errors.New("reservation is not in a state that allows this")
	// ErrReservationExpired is a transition of a hold whose time ran out.
	ErrReservationExpired = errors.New("reservation expired")
	// ErrBackupNotFound is a name that is not one of the backups kept.
	ErrBackupNotFound = errors.New("backup not found")
	// ErrBackupRunning is a backup asked for while another is being taken.
	ErrBackupRunning = errors.New("a backup is being taken")
	// ErrBackupsUnsupported is a backup asked of an engine whose backups
	// are its own (PostgreSQL).
	ErrBackupsUnsupported = errors.New("backups are the database's own")
	// ErrHoldCap is a hold its holder may not take: it would hold more
	// units in open reservations than its cap.
	ErrHoldCap = errors.New("hold cap reached")
)

// IdempotencyKey identifies a write that a client may retry. Scope keeps one
// client's keys apart from another's (the token's digest); Fingerprint is a
// digest of the request, so the same key with another body is refused.
type IdempotencyKey struct {
	Scope       string
	Key         string
	Fingerprint string
}

// idempotencyTTL is how long a key's response is kept for replay.
const idempotencyTTL = 24 * time.Hour

// Limits of the product fields.
const (
	maxSKULen         = 64
	maxNameLen        = 200
	maxDescriptionLen = 4000
	maxCategoryLen    = 64
	maxPriceCents     = 1_000_000_000_000
	maxStock          = 1_000_000_000_000
	defaultCurrency   = "USD"
)

// Product is a catalog entry. Money is an integer number of cents, never a float.
type Product struct {
	ID          int64     `json:"id"`
	SKU         string    `json:"sku"`
	Name        string    `json:"name"`
	Description string    `json:"description"`
	Category    string    `json:"category"`
	PriceCents  int64     `json:"price_cents"`
	Currency    string    `json:"currency"`
	Stock       int64     `json:"stock"`
	Reserved    int64     `json:"reserved"` // units held by open reservations; available = Stock - Reserved
	Version     int64     `json:"version"`
	CreatedAt   time.Time `json:"created_at"`
	UpdatedAt   time.Time `json:"updated_at"`
}

// ProductInput holds the writable fields for a create (POST) or a full
// replacement (PUT). Pointers tell "absent" from "zero" for the required
// fields, so a missing price is an error and not a free product.
type ProductInput struct {
	SKU         *string `json:"sku"`
	Name        *string `json:"name"`
	Description *string `json:"description"`
	Category    *string `json:"category"`
	PriceCents  *int64  `json:"price_cents"`
	Currency    *string `json:"currency"`
	Stock       *int64  `json:"stock"`
}

// Valid reports the problems with in by field name; an empty map means valid.
func (in ProductInput) Valid() map[string]string {
	problems := make(map[string]string)
	if in.SKU == nil {
		problems["sku"] = "is required"
	} else if msg := validSKU(*in.SKU); msg != "" {
		problems["sku"] = msg
	}
	if in.Name == nil {
		problems["name"] = "is required"
	} else if msg := validText(*in.Name, 1, maxNameLen, false); msg != "" {
		problems["name"] = msg
	}
	if in.Description != nil {
		if msg := validText(*in.Description, 0, maxDescriptionLen, true); msg != "" {
			problems["description"] = msg
		}
	}
	if in.Category != nil {
		if msg := validText(*in.Category, 0, maxCategoryLen, false); msg != "" {
			problems["category"] = msg
		}
	}
	if in.PriceCents == nil {
		problems["price_cents"] = "is required"
	} else if msg := validPrice(*in.PriceCents); msg != "" {
		problems["price_cents"] = msg
	}
	if in.Currency != nil {
		if msg := validCurrency(*in.Currency); msg != "" {
			problems["currency"] = msg
		}
	}
	if in.Stock != nil {
		if msg := validStock(*in.Stock); msg != "" {
			problems["stock"] = msg
		}
	}
	return problems
}

// apply writes the input's fields onto p. Optional fields that are absent take
// their defaults, except stock when keepStock is set: a catalogue PUT that
// omits stock must not wipe the inventory that order services maintain.
func (in ProductInput) apply(p *Product, keepStock bool) {
	p.SKU = *in.SKU
	p.Name = *in.Name
	p.PriceCents = *in.PriceCents
	p.Description = deref(in.Description, "")
	p.Category = deref(in.Category, "")
	p.Currency = deref(in.Currency, defaultCurrency)
	if in.Stock != nil {
		p.Stock = *in.Stock
	} else if !keepStock {
		p.Stock = 0
	}
}

// patch returns the full replacement of a product's writable fields (PUT)
// as a merge patch: every field in is set; an optional one that in omits
// resets to its default, except stock, which is kept (see apply).
func (in ProductInput) patch() ProductPatch {
	orDefault := func(v *string) optional[string] {
		if v == nil {
			return optional[string]{Set: true, Null: true}
		}
		return optional[string]{Set: true, Value: *v}
	}
	pt := ProductPatch{
		SKU:         optional[string]{Set: true, Value: *in.SKU},
		Name:        optional[string]{Set: true, Value: *in.Name},
		PriceCents:  optional[int64]{Set: true, Value: *in.PriceCents},
		Description: orDefault(in.Description),
		Category:    orDefault(in.Category),
		Currency:    orDefault(in.Currency),
	}
	if in.Stock != nil {
		pt.Stock = optional[int64]{Set: true, Value: *in.Stock}
	}
	return pt
}

func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// ProductPatch is a JSON merge patch (RFC 7396) of a product. A field that is
// absent keeps its value; a field set to null resets an optional field to its
// default and is an error for a required one.
type ProductPatch struct {
	SKU         optional[string]
	Name        optional[string]
	Description optional[string]
	Category    optional[string]
	PriceCents  optional[int64]
	Currency    optional[string]
	Stock       optional[int64]
}

// optional is one field of a merge patch.
type optional[T any] struct {
	Set   bool // the field was present
	Null  bool // the field was present and null
	Value T
}

// Valid reports the problems with the patch by field name.
func (pt ProductPatch) Valid() map[string]string {
	problems := make(map[string]string)
	checkRequired := func(name string, o optional[string], check func(string) string) {
		switch {
		case o.Null:
			problems[name] = "is required and cannot be null"
		case o.Set:
			if msg := check(o.Value); msg != "" {
				problems[name] = msg
			}
		}
	}
	checkRequired("sku", pt.SKU, validSKU)
	checkRequired("name", pt.Name, func(s string) string { return validText(s, 1, maxNameLen, false) })
	if pt.PriceCents.Null {
		problems["price_cents"] = "is required and cannot be null"
	} else if pt.PriceCents.Set {
		if msg := validPrice(pt.PriceCents.Value); msg != "" {
			problems["price_cents"] = msg
		}
	}
	if pt.Description.Set && !pt.Description.Null {
		if msg := validText(pt.Description.Value, 0, maxDescriptionLen, true); msg != "" {
			problems["description"] = msg
		}
	}
	if pt.Category.Set && !pt.Category.Null {
		if msg := validText(pt.Category.Value, 0, maxCategoryLen, false); msg != "" {
			problems["category"] = msg
		}
	}
	if pt.Currency.Set && !pt.Currency.Null {
		if msg := validCurrency(pt.Currency.Value); msg != "" {
			problems["currency"] = msg
		}
	}
	if pt.Stock.Set && !pt.Stock.Null {
		if msg := validStock(pt.Stock.Value); msg != "" {
			problems["stock"] = msg
		}
	}
	return problems
}

// apply merges the patch into p. It reports whether anything changed.
func (pt ProductPatch) apply(p *Product) bool {
	before := *p
	mergeField(&p.SKU, pt.SKU, "")
	mergeField(&p.Name, pt.Name, "")
	mergeField(&p.Description, pt.Description, "")
	mergeField(&p.Category, pt.Category, "")
	mergeField(&p.PriceCents, pt.PriceCents, 0)
	mergeField(&p.Currency, pt.Currency, defaultCurrency)
	mergeField(&p.Stock, pt.Stock, 0)
	return *p != before
}

// ProductUpdate is a write to one product, as data: a merge patch, applied
// to the product as it is when the write runs, if its version satisfies
// IfMatch (nil: any version).
type ProductUpdate struct {
	Patch   ProductPatch
	IfMatch *IfMatch
}

func mergeField[T any](dst *T, o optional[T], def T) {
	switch {
	case o.Null:
		*dst = def
	case o.Set:
		*dst = o.Value
	}
}

func validSKU(s string) string {
	if s == "" || len(s) > maxSKULen {
		return fmt.Sprintf("must be 1 to %d characters", maxSKULen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return "may contain only A-Z, a-z, 0-9, '.', '_' and '-'"
		}
	}
	return ""
}

// validText checks a free-text field: valid UTF-8, min to max characters, no
// control characters (newlines and tabs only where multiline is set).
func validText(s string, min, max int, multiline bool) string {
	if !utf8.ValidString(s) {
		return "must be valid UTF-8"
	}
	n := utf8.RuneCountInString(s)
	if n < min || n > max {
		if min == 0 {
			return fmt.Sprintf("must be at most %d characters", max)
		}
		return fmt.Sprintf("must be %d to %d characters", min, max)
	}
	for _, r := range s {
		if unicode.IsControl(r) && !(multiline && (r == '\n' || r == '\t' || r == '\r')) {
			return "must not contain control characters"
		}
	}
	if min > 0 && strings.TrimSpace(s) == "" {
		return "must not be blank"
	}
	return ""
}

func validPrice(v int64) string {
	if v < 0 || v > maxPriceCents {
		return "must be an integer from 0 to 1000000000000"
	}
	return ""
}

func validStock(v int64) string {
	if v < 0 || v > maxStock {
		return "must be an integer from 0 to 1000000000000"
	}
	return ""
}

func validCurrency(s string) string {
	if len(s) != 3 {
		return "must be 3 upper-case letters (ISO 4217)"
	}
	for i := 0; i < 3; i++ {
		if s[i] < 'A' || s[i] > 'Z' {
			return "must be 3 upper-case letters (ISO 4217)"
		}
	}
	return ""
}

// ValidationError lists problems by field. It unwraps to ErrInvalid.
type ValidationError struct {
	Problems map[string]string
}

func (e *ValidationError) Error() string {
	keys := make([]string, 0, len(e.Problems))
	for k, v := range e.Problems {
		keys = append(keys, k+" "+v)
	}
	slices.Sort(keys)
	return "invalid input: " + strings.Join(keys, "; ")
}

func (e *ValidationError) Unwrap() error { return ErrInvalid }

// BadRequestError is input that could not be read at all: malformed JSON, a
// wrong JSON type, a bad query parameter or path. Problems names the
// offending fields or parameters when they are known. It unwraps to ErrInvalid.
type BadRequestError struct {
	Detail   string
	Problems map[string]string
}

func (e *BadRequestError) Error() string { return e.Detail }
func (e *BadRequestError) Unwrap() error { return ErrInvalid }

// badParam returns a BadRequestError about one field or parameter.
func badParam(name, msg string) *BadRequestError {
	return &BadRequestError{Detail: name + " " + msg, Problems: map[string]string{name: msg}}
}

// IfMatch is a parsed If-Match header. A nil *IfMatch is no precondition.
type IfMatch struct {
	Any      bool    // "*": any current version
	Versions []int64 // the versions named by strong entity tags
}

// check returns ErrPrecondition unless version satisfies m.
func (m *IfMatch) check(version int64) error {
	if m == nil || m.Any || slices.Contains(m.Versions, version) {
		return nil
	}
	return ErrPrecondition
}

// ListFilter selects and orders a page of products.
type ListFilter struct {
	Limit         int
	Category      *string
	Terms         []string // full-text search words (letters and digits); all must match as prefixes
	MinPriceCents *int64
	MaxPriceCents *int64
	InStock       *bool
	Sort          string // column name
	Desc          bool
	After         *cursor // keyset position; nil for the first page
}

// Page is one page of a listing. NextCursor is empty on the last page.
type Page struct {
	Items      []Product
	NextCursor string
}

// Reservation states. A hold starts held and ends confirmed (its units leave
// stock), released (they return) or expired (its time ran out; they return).
const (
	StateHeld      = "held"
	StateConfirmed = "confirmed"
	StateReleased  = "released"
	StateExpired   = "expired"
)

// Limits of a reservation.
const (
	maxReservationLines = 100
	maxReferenceLen     = 128
	defaultHoldTTL      = 900 // seconds
	maxHoldTTL          = 86400
)

// Reservation holds units of products for an order until it is confirmed,
// released or expires. Its id is opaque.
type Reservation struct {
	ID        string            `json:"id"`
	State     string            `json:"state"`
	Reference string            `json:"reference"`
	Lines     []ReservationLine `json:"lines"`
	CreatedAt time.Time         `json:"created_at"`
	ExpiresAt time.Time         `json:"expires_at"`
	UpdatedAt time.Time         `json:"updated_at"`
	// CreatedBy is who holds it: the name of the credential that made it
	// (empty for reservations from before it was recorded).
	CreatedBy string `json:"created_by,omitempty"`
}

// ReservationLine is a quantity of one product.
type ReservationLine struct {
	ProductID int64 `json:"product_id"`
	Quantity  int64 `json:"quantity"`
}

// ReservationInput is the body of POST /reservations. TTLSeconds nil means
// defaultHoldTTL.
type ReservationInput struct {
	Reference  *string           `json:"reference"`
	Lines      []ReservationLine `json:"lines"`
	TTLSeconds *int64            `json:"ttl_seconds"`
}

// Valid reports the problems with in by field name (lines by index).
func (in ReservationInput) Valid() map[string]string {
	problems := make(map[string]string)
	switch {
	case in.Reference == nil:
		problems["reference"] = "is required"
	case utf8.RuneCountInString(*in.Reference) < 1 || utf8.RuneCountInString(*in.Reference) > maxReferenceLen || !utf8.ValidString(*in.Reference):
		problems["reference"] = fmt.Sprintf("must be 1 to %d characters", maxReferenceLen)
	case strings.IndexFunc(*in.Reference, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0:
		problems["reference"] = "must be printable characters"
	}
	if in.TTLSeconds != nil && (*in.TTLSeconds < 1 || *in.TTLSeconds > maxHoldTTL) {
		problems["ttl_seconds"] = fmt.Sprintf("must be an integer from 1 to %d", maxHoldTTL)
	}
	if len(in.Lines) < 1 || len(in.Lines) > maxReservationLines {
		problems["lines"] = fmt.Sprintf("must have 1 to %d lines", maxReservationLines)
		// Then the count is the lines' problem: naming each line's own
		// would make the answer grow with the input.
		return problems
	}
	seen := make(map[int64]int, len(in.Lines))
	for i, l := range in.Lines {
		field := fmt.Sprintf("lines[%d]", i)
		switch {
		case l.ProductID < 1:
			problems[field+".product_id"] = "must be a positive integer"
		case seen[l.ProductID] > 0:
			problems[field+".product_id"] = fmt.Sprintf("repeats the product of lines[%d]; one line per product", seen[l.ProductID]-1)
		default:
			seen[l.ProductID] = i + 1
		}
		if l.Quantity < 1 || l.Quantity > maxStock {
			problems[field+".quantity"] = "must be an integer from 1 to 1000000000000"
		}
	}
	return problems
}

// Shortage is a reservation line the stock cannot cover.
type Shortage struct {
	Line      int // index in the request
	ProductID int64
	Requested int64
	Available int64
}

// HoldCapError is a reservation refused because its holder would then hold
// more than Cap units in open reservations: it holds Held, and the
// reservation asks for Requested. Nothing was held. It unwraps to
// ErrHoldCap.
type HoldCapError struct{ Cap, Held, Requested int64 }

func (e *HoldCapError) Error() string {
	return fmt.Sprintf("this credential may hold at most %d units in open reservations; it holds %d and this reservation asks for %d more; nothing was held",
		e.Cap, e.Held, e.Requested)
}
func (e *HoldCapError) Unwrap() error { return ErrHoldCap }

// ShortageError is a reservation refused because lines are short; nothing
// was held. It unwraps to ErrInsufficientStock.
type ShortageError struct{ Lines []Shortage }

func (e *ShortageError) Error() string {
	return fmt.Sprintf("insufficient stock for %d of the lines", len(e.Lines))
}
func (e *ShortageError) Unwrap() error { return ErrInsufficientStock }

// Event is one committed write in the change feed. Seq increases in commit
// order. Product events carry the product id and version (and the product
// as it became, except after a delete); reservation events the reservation.
type Event struct {
	Seq         int64
	Type        string
	OccurredAt  time.Time
	Actor       string // who made the write; empty for the service's own (an expiry)
	ProductID   int64
	Version     int64
	Product     *Product
	Reservation *Reservation
}

// Event types.
const (
	EventProductCreated       = "product.created"
	EventProductUpdated       = "product.updated"
	EventProductDeleted       = "product.deleted"
	EventStockChanged         = "stock.changed"
	EventReservationHeld      = "reservation.held"
	EventReservationConfirmed = "reservation.confirmed"
	EventReservationReleased  = "reservation.released"
	EventReservationExpired   = "reservation.expired"
)

// FeedGoneError is a feed position older than the oldest event kept. It
// unwraps to ErrFeedGone.
type FeedGoneError struct{ Oldest int64 }

func (e *FeedGoneError) Error() string {
	return fmt.Sprintf("events before seq %d are no longer kept; resync and follow from there", e.Oldest)
}
func (e *FeedGoneError) Unwrap() error { return ErrFeedGone }

// FeedResetError is a feed position beyond the head of the change log: one
// taken from another log (another database, or this one before a restore)
// or made up. Following from it would skip every event up to it, silently;
// the consumer must resync. It unwraps to ErrFeedGone.
// LogID, when set, is the current log's id: the position came with
// another's.
type FeedResetError struct {
	Head  int64
	LogID string
}

func (e *FeedResetError) Error() string {
	if e.LogID != "" {
		return fmt.Sprintf("the position is of another change log; this feed's log_id is %s, its head seq %d; resync and follow from the head", e.LogID, e.Head)
	}
	return fmt.Sprintf("the position is beyond the head of this change feed (seq %d): it is not from this feed; resync and follow from the head", e.Head)
}
func (e *FeedResetError) Unwrap() error { return ErrFeedGone }

// ErrFeedGone is a change-feed position that retention has trimmed.
var ErrFeedGone = errors.New("feed position no longer kept")
