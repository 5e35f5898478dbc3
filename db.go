package main

// The store boundary: the interface the service needs of a database, what
// both engines share (configuration, the error vocabulary, idempotency
// records, the migrations rule), and the choice of engine. The engines are
// sqlite.go (embedded, the default) and postgres.go (DATABASE_URL).

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/runes"
	"golang.org/x/text/transform"
	"golang.org/x/text/unicode/norm"
)

// productStore is what the service needs of a database. Every method takes
// the request's context and domain values, and returns the committed domain
// value or a domain error (ErrNotFound, ErrConflict, ErrInsufficientStock,
// ErrPrecondition, ErrInvalid, ErrIdempotencyMismatch, a *Replay, or an
// error that unwraps to ErrUnavailable when the database itself fails).
//
// A store knows nothing of HTTP or of caches. Writes are atomic under any
// number of connections and processes: every returned product carries the
// version it was committed at, and the service keeps its caches coherent by
// that version alone.
type productStore interface {
	// Backend names the engine: "sqlite" or "postgres".
	Backend() string
	Get(ctx context.Context, id int64) (Product, error)
	List(ctx context.Context, f ListFilter) (Page, error)
	// Create inserts p and returns it with its id, version 1 and timestamps.
	Create(ctx context.Context, p Product, idem *IdempotencyKey) (Product, error)
	// Update applies change to the current product inside the write's
	// transaction and stores the result at the next version. change may
	// return ErrPrecondition, a validation error, or errUnchanged (nothing
	// to write: the current product is returned as it is).
	Update(ctx context.Context, id int64, change func(*Product) error) (Product, error)
	// AdjustStock adds delta to the stock in one atomic step; check, if not
	// nil, sees the current version first (If-Match). It returns
	// ErrInsufficientStock, changing nothing, if stock would leave its range.
	AdjustStock(ctx context.Context, id, delta int64, check func(version int64) error, idem *IdempotencyKey) (Product, error)
	// Delete removes the product and returns it as it was. check, if not
	// nil, sees it first and may refuse with ErrPrecondition.
	Delete(ctx context.Context, id int64, check func(Product) error) (Product, error)
	// Reserve holds r.Lines (r.ID and r.Reference set by the caller) for
	// ttl, all or nothing, and returns the held reservation and the products
	// whose reserved units changed. It returns a *ValidationError naming a
	// line whose product does not exist, or a *ShortageError naming every
	// short line, and then holds nothing.
	Reserve(ctx context.Context, r Reservation, ttl time.Duration, idem *IdempotencyKey) (Reservation, []Product, error)
	// Transition confirms or releases reservation id (to is StateConfirmed
	// or StateReleased). Repeating a transition changes nothing; the other
	// one after it is ErrInvalidState; a hold whose time ran out is recorded
	// expired and returned in that state. It returns the products that
	// changed, or ErrReservationNotFound.
	Transition(ctx context.Context, id, to string) (Reservation, []Product, error)
	Reservation(ctx context.Context, id string) (Reservation, error)
	ReservationsByReference(ctx context.Context, ref string, limit int) ([]Reservation, error)
	// ExpireReservations records up to limit held reservations whose time
	// ran out as expired, and returns how many and the products changed.
	ExpireReservations(ctx context.Context, limit int) (int, []Product, error)
	// Events returns up to limit change-feed events after seq after, in
	// seq order, never skipping one that commits later; a *FeedGoneError
	// when retention trimmed events after after.
	Events(ctx context.Context, after int64, limit int) ([]Event, error)
	// TrimEvents deletes events older than before, in small batches.
	TrimEvents(ctx context.Context, before time.Time) (int64, error)
	Ping(ctx context.Context) error
	// ProbeWrite makes one small real write, to learn whether writes work
	// again after a failure.
	ProbeWrite(ctx context.Context) error
	// ExpireIdempotencyKeys deletes idempotency records older than
	// idempotencyTTL in small batches, each its own transaction, so a
	// backlog of any size never holds up client writes. It returns how many
	// it deleted.
	ExpireIdempotencyKeys(ctx context.Context) (int64, error)
	// Count returns the number of products, cheaply (it may lag writes by a
	// few seconds on engines that cannot maintain it exactly).
	Count() int64
	Close() error
}

// sharedLog is implemented by a store that other processes write to as
// well (PostgreSQL: any number of replicas). The service then follows the
// store's change log (Events) to learn their writes; see follower. SQLite
// does not implement it: one process holds the file, so its own writes
// are all the writes.
type sharedLog interface {
	// Head returns the change log's head and whether committed writes
	// without a seq exist: when not, and head is at or below a position,
	// every write committed before Head was called is at or below it. One
	// read-only query.
	Head(ctx context.Context) (head int64, pending bool, err error)
	// Changes returns the change log's head, and up to limit events: those
	// after seq after, in seq order, then those of committed writes not
	// given a seq yet (seq 0). Every write committed before Changes was
	// called has an event at or below head, or among those returned. It
	// writes nothing, and returns a *FeedGoneError when events after after
	// were trimmed.
	Changes(ctx context.Context, after int64, limit int) (head int64, es []Event, err error)
	// Sequence gives the events of committed writes their seqs. Events
	// does it too; writers call it so that Changes finds few without one.
	Sequence(ctx context.Context) error
	// Listen calls wake with the sender's name whenever Notify is called,
	// by any process, until ctx ends, and with "" after each (re)connect.
	// Notifications may be lost (a reconnect); they only save the
	// follower from waiting for its next periodic look.
	Listen(ctx context.Context, wake func(from string)) error
	// Notify tells every Listen that process from wrote to the change log.
	Notify(ctx context.Context, from string) error
}

// StoreConfig configures openStore.
type StoreConfig struct {
	// DatabaseURL selects PostgreSQL when set (postgres:// or
	// postgresql://); otherwise the SQLite file at Path is used.
	DatabaseURL string
	Path        string
	Sync        string        // SQLite: "full" or "normal"
	Timeout     time.Duration // bound on every query and on each write
	Readers     int           // SQLite read-only connections; 0 picks a default
}

// openStore opens and migrates the store cfg selects.
func openStore(ctx context.Context, cfg StoreConfig) (productStore, error) {
	if cfg.DatabaseURL != "" {
		return openPostgres(ctx, cfg)
	}
	return openSQLite(ctx, cfg)
}

// postgresURL checks that s is a PostgreSQL URL the service accepts.
func postgresURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") || u.Host == "" && u.Query().Get("host") == "" {
		return errors.New("must be a postgres:// or postgresql:// URL with a host")
	}
	return nil
}

// redactURL returns s with any password replaced, for logs.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparsable)"
	}
	q := u.Query()
	if q.Has("password") {
		q.Set("password", "xxxxx")
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}

// encodeSnapshot stores what a write made with an Idempotency-Key
// produced (a Product or a Reservation). It is the domain value's own
// encoding, not an HTTP body: the handler shapes a replayed response the
// way it shapes the first one.
func encodeSnapshot(v any) []byte {
	b, _ := json.Marshal(v) // a Product or a Reservation always encodes
	return b
}

// productReplay and reservationReplay read a snapshot back as the replay
// of a product write or of a reservation.
func productReplay(b []byte) (*Replay, error) {
	var p Product
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("idempotency record: %w", err)
	}
	return &Replay{Product: p}, nil
}

func reservationReplay(b []byte) (*Replay, error) {
	var r Reservation
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("idempotency record: %w", err)
	}
	return &Replay{Reservation: &r}, nil
}

// replayOrMismatch turns a live idempotency record for k into the error a
// retried write returns.
func replayOrMismatch(k *IdempotencyKey, fingerprint string, snapshot []byte, decode func([]byte) (*Replay, error)) error {
	if fingerprint != k.Fingerprint {
		return ErrIdempotencyMismatch
	}
	r, err := decode(snapshot)
	if err != nil {
		return err
	}
	return r
}

// expireBatch bounds the idempotency records one expiry transaction
// deletes: a batch takes milliseconds, whatever the backlog.
const expireBatch = 500

// errSchemaNewer is a database migrated by a newer binary than this one.
var errSchemaNewer = errors.New("the database schema is newer than this binary")

// checkSchemaVersion refuses a database whose schema is newer than the
// migrations this binary knows: an older binary must not write rows it
// does not understand (see the README, "Upgrades").
func checkSchemaVersion(applied, known int) error {
	if applied > known {
		return fmt.Errorf("%w: schema version %d, this binary knows %d; run a binary at least as new as the one that migrated it",
			errSchemaNewer, applied, known)
	}
	return nil
}

// dbFailure is a failure of the database itself (I/O error, disk full,
// read-only file, lost connection, lock held past the timeout, deadline):
// the kind of error the circuit breaker counts. It unwraps to
// ErrUnavailable; the driver's text stays in the log and never reaches a
// client.
type dbFailure struct{ err error }

func (e *dbFailure) Error() string   { return "database failure: " + e.err.Error() }
func (e *dbFailure) Unwrap() []error { return []error{ErrUnavailable, e.err} }

// translateKnown passes through errors that are already domain errors and
// turns "no rows" into ErrNotFound. It reports whether it recognised err.
// Engines call it first, then translate their driver's errors, then call
// translateGeneric.
func translateKnown(err error) (error, bool) {
	if errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalid) ||
		errors.Is(err, ErrConflict) || errors.Is(err, ErrInsufficientStock) || errors.Is(err, ErrPrecondition) ||
		errors.Is(err, ErrIdempotencyMismatch) || errors.Is(err, errUnchanged) || errors.Is(err, ErrReserved) ||
		errors.Is(err, ErrReservationNotFound) || errors.Is(err, ErrInvalidState) || errors.Is(err, ErrFeedGone) {
		return err, true
	}
	if _, ok := errors.AsType[*Replay](err); ok {
		return err, true
	}
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNotFound, true
	}
	return nil, false
}

// translateGeneric classifies what no engine recognised: a cancellation is
// the client's doing; a deadline, a lost connection or a closed pool is a
// database failure. ctx is the context the failed call ran under.
func translateGeneric(ctx context.Context, err error) error {
	switch {
	case errors.Is(err, context.Canceled):
		return err
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, driver.ErrBadConn),
		errors.Is(err, sql.ErrConnDone), errors.Is(err, sql.ErrTxDone),
		err.Error() == "sql: database is closed": // database/sql does not export it
		return &dbFailure{err}
	}
	if ctx.Err() != nil {
		if errors.Is(ctx.Err(), context.Canceled) {
			return context.Canceled
		}
		return &dbFailure{err}
	}
	return err
}

// errUnchanged tells Update that a change left the product as it was.
var errUnchanged = errors.New("unchanged")

// backedOut reports whether a write that failed with err changed nothing:
// it failed before writing, or its one statement failed and was backed out.
func backedOut(err error) bool {
	var verr *ValidationError
	return errors.Is(err, ErrNotFound) || errors.Is(err, ErrConflict) || errors.Is(err, ErrInsufficientStock) ||
		errors.Is(err, ErrPrecondition) || errors.Is(err, ErrInvalid) || errors.As(err, &verr) ||
		errors.Is(err, ErrReserved) || errors.Is(err, ErrReservationNotFound) || errors.Is(err, ErrInvalidState)
}

// Full-text terms. The service hands the store words (runs of letters and
// digits); each engine builds its own query, in which every word must match
// as a prefix of a word in the name or the description.

// ftsMatch builds the SQLite FTS5 expression for terms: each a quoted
// prefix term, so no input can be read as FTS5 syntax.
func ftsMatch(terms []string) string {
	var b strings.Builder
	for i, t := range terms {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(`"` + t + `"*`)
	}
	return b.String()
}

// searchText is the text PostgreSQL indexes for a product: name and
// description folded the way SQLite's unicode61 tokenizer folds them
// (diacritics removed), every run of letters and digits a word and
// everything else a space. So both stores split text into the same words,
// and the words of q match the same products on either.
func searchText(name, description string) string {
	folded := name + " " + description
	if !isASCII(folded) { // ASCII has no diacritics to fold: skip the costly normalisation
		if f, _, err := transform.String(transform.Chain(norm.NFD, runes.Remove(runes.In(unicode.Mn)), norm.NFC), folded); err == nil {
			folded = f
		}
	}
	return strings.Map(func(r rune) rune {
		if unicode.IsLetter(r) || unicode.IsDigit(r) {
			return r
		}
		return ' '
	}, folded)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// tsQuery builds the PostgreSQL tsquery text for terms: every word a
// prefix match, all required. Terms hold only letters and digits, which
// tsquery syntax reads as plain lexemes.
func tsQuery(terms []string) string {
	var words []string
	for _, t := range terms {
		words = append(words, strings.Fields(searchText(t, ""))...) // folded as the indexed text is
	}
	for i := range words {
		words[i] += ":*"
	}
	return strings.Join(words, " & ")
}
