package main

// The store boundary: the interface the service needs of a database, what
// both engines share (configuration, the error vocabulary, idempotency
// records, the migrations rule), and the choice of engine. The engines are
// sqlite.go (embedded, the default) and postgres.go (DATABASE_URL).

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"embed"
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
// ErrPrecondition, ErrInvalid, ErrIdempotencyMismatch, ..., or an error that
// unwraps to ErrUnavailable when the database itself fails). Writes take
// data — a product, a patch, a delta, a precondition — never a function:
// the store applies the domain's rules in the write's own transaction.
//
// Every write names its actor, who asked for it (a credential's name; ""
// for the service's own work), as an explicit argument rather than a value
// in the context, so that a write is fully described by its arguments like
// any other data it takes; the store records it on the write's change-feed
// events. Reserve's actor is its reservation's CreatedBy.
//
// A store knows nothing of HTTP or of caches. Writes are atomic under any
// number of connections and processes: every returned product carries the
// version it was committed at, and the service keeps its caches coherent by
// that version alone. A write with an Idempotency-Key that was used before
// is not applied again: it returns what the first request produced and
// reports it as a replay.
type productStore interface {
	// Backend names the engine: "sqlite" or "postgres".
	Backend() string
	Get(ctx context.Context, id int64) (Product, error)
	List(ctx context.Context, f ListFilter) (Page, error)
	// Create inserts p and returns it with its id, version 1 and
	// timestamps, and whether it is a replay of key.
	Create(ctx context.Context, actor string, p Product, key *IdempotencyKey) (Product, bool, error)
	// Update applies u and returns the product as it is after the call,
	// and whether the call changed it (a patch that changes nothing
	// writes nothing).
	Update(ctx context.Context, actor string, id int64, u ProductUpdate) (Product, bool, error)
	// AdjustStock adds delta to the stock in one atomic step, if cond
	// holds, and reports whether the result is a replay of key. It
	// returns ErrInsufficientStock, changing nothing, if stock would leave
	// its range.
	AdjustStock(ctx context.Context, actor string, id, delta int64, cond *IfMatch, key *IdempotencyKey) (Product, bool, error)
	// Delete removes the product, if cond holds, and returns it as it was.
	Delete(ctx context.Context, actor string, id int64, cond *IfMatch) (Product, error)
	// Reserve holds r.Lines (r.ID and r.Reference set by the caller) for
	// ttl, all or nothing. It returns a *ValidationError naming a line
	// whose product does not exist, or a *ShortageError naming every
	// short line, and then holds nothing. With maxHeld above 0 it returns
	// a *HoldCapError, holding nothing, if r.CreatedBy would hold more
	// than maxHeld units in open reservations, counted in the same
	// transaction as the hold.
	Reserve(ctx context.Context, r Reservation, ttl time.Duration, maxHeld int64, key *IdempotencyKey) (Reserved, error)
	// Transition confirms or releases reservation id (to is StateConfirmed
	// or StateReleased). Repeating a transition changes nothing; the other
	// one after it is ErrInvalidState; a hold whose time ran out is
	// recorded expired and returned in that state. It returns
	// ErrReservationNotFound.
	Transition(ctx context.Context, actor, id, to string) (Reserved, error)
	Reservation(ctx context.Context, id string) (Reservation, error)
	ReservationsByReference(ctx context.Context, ref string, limit int) ([]Reservation, error)
	// NextHoldExpiry returns when the earliest open hold expires (the zero
	// time when none is open).
	NextHoldExpiry(ctx context.Context) (time.Time, error)
	// ExpireReservations records up to limit held reservations whose time
	// ran out as expired, and returns how many and the products changed.
	ExpireReservations(ctx context.Context, limit int) (int, []Product, error)
	// Events returns up to limit change-feed events after seq after, in
	// seq order, never skipping one that commits later; a *FeedGoneError
	// when retention trimmed events after after.
	Events(ctx context.Context, after int64, limit int) ([]Event, error)
	// FeedHead returns the change feed's head: the highest seq given, or
	// the trimmed-through mark when retention deleted every event.
	FeedHead(ctx context.Context) (int64, error)
	// LogID returns the change log's identity: positions of one log mean
	// nothing in another (another database, or this one before a restore).
	LogID(ctx context.Context) (string, error)
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

// Reserved is what a reservation write committed: the reservation, the
// products whose reserved units or stock changed, and whether it is the
// replay of an earlier request with the same Idempotency-Key (then nothing
// changed now).
type Reserved struct {
	Reservation Reservation
	Changed     []Product
	Replayed    bool
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
	// KeepUnpublished keeps change-feed events the relay has not published
	// from retention: set when the relay is on.
	KeepUnpublished bool
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

// migrationFiles holds each engine's numbered migrations,
// migrations/<engine>/NNNN_name.sql. Append only: a released migration
// never changes (TestMigrations_unchanged holds their digests).
//
//go:embed migrations
var migrationFiles embed.FS

// migrationsOf returns engine's migrations in order. Their names must be
// numbered 0001, 0002, ... without a gap: a mistake there is the binary's,
// and it panics at start (and in every test).
func migrationsOf(engine string) []string {
	dir := "migrations/" + engine
	entries, err := migrationFiles.ReadDir(dir) // sorted by name
	if err != nil {
		panic(err)
	}
	var out []string
	for i, e := range entries {
		if !strings.HasPrefix(e.Name(), fmt.Sprintf("%04d_", i+1)) || !strings.HasSuffix(e.Name(), ".sql") {
			panic(fmt.Sprintf("migration %s/%s: want %04d_<name>.sql", dir, e.Name(), i+1))
		}
		b, err := migrationFiles.ReadFile(dir + "/" + e.Name())
		if err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	return out
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
		errors.Is(err, ErrIdempotencyMismatch) || errors.Is(err, ErrReserved) ||
		errors.Is(err, ErrReservationNotFound) || errors.Is(err, ErrInvalidState) || errors.Is(err, ErrFeedGone) {
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
