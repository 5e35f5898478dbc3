package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// pgMigrations are PostgreSQL's numbered migrations (migrations/postgres),
// applied in order, each once, all pending ones in one transaction under an
// advisory lock.
//
// Text that is sorted or compared (sku, name, category) is COLLATE "C":
// byte order, as in SQLite, so a cursor walk returns the same sequence
// whichever store serves it. Ids come from an identity that is never reused;
// BY DEFAULT so that -copy-to can keep a SQLite catalog's ids. search is the
// full-text vector of name and description, written with each row from the
// text searchText folds (see there). Events are given their seq after they
// commit, by one sequencer at a time (see sequenceEvents).
var pgMigrations = migrationsOf("postgres")

// pgDialect is how PostgreSQL's statements differ: row locks, timestamptz,
// and the full-text vector kept in products.search.
var pgDialect = newDialect(dialect{
	forUpdate:    " FOR UPDATE",
	ts:           func(t time.Time) any { return t },
	searchColumn: true,
	fullText: func(terms []string, _ bool) (string, string, any, string) {
		return "products", "products.search @@ to_tsquery('simple', ?)", tsQuery(terms), "products.id"
	},
	// A transaction-scoped advisory lock per holder, in a key space of its
	// own (the first key spells "hold").
	lockHolder: `SELECT pg_advisory_xact_lock(1752132708, hashtext(?))`,
})

// pgMigrationLock is the advisory lock key under which replicas migrate,
// so N replicas starting at once apply each migration once.
const pgMigrationLock = 0x70726f6475637473 // "products"

// postgresStore is the PostgreSQL product store: a pgx connection pool, each
// write its own transaction, committed concurrently. Read-modify-write is
// made atomic by row locks (SELECT ... FOR UPDATE) or by doing it in one
// statement, so any number of connections and replicas can write.
type postgresStore struct {
	sqlStore
	pool *pgxpool.Pool

	countMu sync.Mutex
	count   int64
	countAt time.Time
}

// openPostgres connects to cfg.DatabaseURL and migrates the schema. The
// URL's parameters (sslmode, pool_max_conns, ...) are honoured.
func openPostgres(ctx context.Context, cfg StoreConfig) (*postgresStore, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	pcfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		// pgx's message may quote the URL; never the password.
		return nil, errors.New("parse DATABASE_URL: not a valid PostgreSQL connection URL")
	}
	if u, err := url.Parse(cfg.DatabaseURL); err == nil && !u.Query().Has("pool_max_conns") {
		// pgx's default (the CPU count, at least 4) is sized for a
		// client; a server's handlers wait on commits, so allow more.
		pcfg.MaxConns = int32(max(8, 4*runtime.GOMAXPROCS(0)))
	}
	if pcfg.ConnConfig.ConnectTimeout == 0 || pcfg.ConnConfig.ConnectTimeout > cfg.Timeout {
		pcfg.ConnConfig.ConnectTimeout = cfg.Timeout
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	s := &postgresStore{pool: pool}
	s.sqlStore = sqlStore{eng: s, d: pgDialect, timeout: cfg.Timeout, now: time.Now, keepUnpublished: cfg.KeepUnpublished}
	mctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := s.migrate(mctx); err != nil {
		pool.Close()
		return nil, err
	}
	return s, nil
}

func (s *postgresStore) migrate(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(pgMigrationLock)); err != nil {
			return fmt.Errorf("migrate: lock: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
			version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		var applied int
		if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&applied); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		if err := checkSchemaVersion(applied, len(pgMigrations)); err != nil {
			return err
		}
		for i := applied; i < len(pgMigrations); i++ {
			if _, err := tx.Exec(ctx, pgMigrations[i]); err != nil {
				return fmt.Errorf("migrate to version %d: %w", i+1, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO schema_migrations (version) VALUES ($1)`, i+1); err != nil {
				return fmt.Errorf("migrate to version %d: %w", i+1, err)
			}
		}
		return nil
	})
}

// Backend names the engine.
func (s *postgresStore) Backend() string { return "postgres" }

// Close closes every connection.
func (s *postgresStore) Close() error {
	s.pool.Close()
	return nil
}

// Stat returns the pool's statistics.
func (s *postgresStore) Stat() *pgxpool.Stat { return s.pool.Stat() }

// Count returns the number of products. PostgreSQL has no cheap exact
// count and other replicas write too, so it counts at most every 10 s.
func (s *postgresStore) Count() int64 {
	s.countMu.Lock()
	defer s.countMu.Unlock()
	if time.Since(s.countAt) < 10*time.Second {
		return s.count
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	var n int64
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM products`).Scan(&n); err == nil {
		s.count = n
	}
	s.countAt = time.Now()
	return s.count
}

// inTx runs fn in a transaction bounded by the store's timeout and commits
// it. A transaction that lost a deadlock or a serialization check is run
// again (fn must be safe to re-run: it sees the database afresh).
func (s *postgresStore) inTx(ctx context.Context, fn func(ctx context.Context, tx pgx.Tx) error) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return fn(ctx, tx) })
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || (pe.Code != "40001" && pe.Code != "40P01") {
			break
		}
	}
	return pgTranslate(ctx, err)
}

// The engine's side of sqlStore.
func (s *postgresStore) reader() querier { return pgQuerier{s.pool} }

func (s *postgresStore) translate(ctx context.Context, err error) error { return pgTranslate(ctx, err) }

// write runs fn in a transaction of its own (see inTx). With key, the key is
// claimed first: two transactions with one key serialise on its primary
// key, and the second, once the first commits, finds its record and
// replays it.
func (s *postgresStore) write(ctx context.Context, key *IdempotencyKey, fn func(ctx context.Context, q querier) ([]byte, error)) ([]byte, error) {
	var replay []byte
	err := s.inTx(ctx, func(ctx context.Context, tx pgx.Tx) error {
		replay = nil
		if key != nil {
			r, err := s.claimKey(ctx, tx, key)
			if err != nil || r != nil {
				replay = r
				return err
			}
		}
		snapshot, err := fn(ctx, pgQuerier{tx})
		if err != nil || key == nil {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE idempotency_keys SET product = $3 WHERE scope = $1 AND key = $2`, key.Scope, key.Key, snapshot)
		return err
	})
	return replay, err
}

// alone runs fn in a transaction of its own.
func (s *postgresStore) alone(ctx context.Context, fn func(ctx context.Context, q querier) error) error {
	return s.inTx(ctx, func(ctx context.Context, tx pgx.Tx) error { return fn(ctx, pgQuerier{tx}) })
}

// claimKey claims k for this transaction before its write. An expired
// record is taken over. claimKey returns nil when the key is claimed, else
// the live record's snapshot, or ErrIdempotencyMismatch.
func (s *postgresStore) claimKey(ctx context.Context, tx pgx.Tx, k *IdempotencyKey) ([]byte, error) {
	now := s.now()
	tag, err := tx.Exec(ctx, `INSERT INTO idempotency_keys (scope, key, fingerprint, created_at) VALUES ($1, $2, $3, $4)
		ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint, product = NULL, created_at = excluded.created_at
		WHERE idempotency_keys.created_at <= $5`, k.Scope, k.Key, k.Fingerprint, now, now.Add(-idempotencyTTL))
	if err != nil {
		return nil, err
	}
	if tag.RowsAffected() == 1 {
		return nil, nil
	}
	return idempotencyRecord(ctx, pgQuerier{tx}, pgDialect, k, now)
}

// Create inserts p; see sqlStore.Create. Without an Idempotency-Key it is
// one statement (createAlone).
func (s *postgresStore) Create(ctx context.Context, actor string, p Product, key *IdempotencyKey) (Product, bool, error) {
	if key != nil {
		return s.sqlStore.Create(ctx, actor, p, key)
	}
	out, err := s.createAlone(ctx, actor, p)
	return out, false, err
}

// AdjustStock adds delta to the stock; see sqlStore.AdjustStock. Without a
// precondition or an Idempotency-Key it is one statement when it can be
// (adjustAlone).
func (s *postgresStore) AdjustStock(ctx context.Context, actor string, id, delta int64, cond *IfMatch, key *IdempotencyKey) (Product, bool, error) {
	if cond == nil && key == nil {
		if p, done, err := s.adjustAlone(ctx, actor, id, delta); done || err != nil {
			return p, false, err
		}
	}
	return s.sqlStore.AdjustStock(ctx, actor, id, delta, cond, key)
}

// pgProductJSON builds a product's feed representation from its row, for
// the writes that record their event in the same statement: the names are
// Product's JSON names, which readEvents decodes.
const pgProductJSON = `jsonb_build_object('id', id, 'sku', sku, 'name', name, 'description', description,
	'category', category, 'price_cents', price_cents, 'currency', currency, 'stock', stock, 'reserved', reserved,
	'version', version, 'created_at', created_at, 'updated_at', updated_at)`

// createAlone is Create without an Idempotency-Key: the product and its
// event in one statement, one round trip, atomic by itself.
func (s *postgresStore) createAlone(ctx context.Context, actor string, p Product) (Product, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	now := s.nowMicro()
	p.Version, p.Reserved, p.CreatedAt, p.UpdatedAt = 1, 0, now, now
	err := s.pool.QueryRow(ctx, `WITH p AS (INSERT INTO products
			(sku, name, description, category, price_cents, currency, stock, version, created_at, updated_at, search)
			VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $8, to_tsvector('simple', $9)) RETURNING *),
		e AS (INSERT INTO events (type, occurred_at, product_id, version, data, actor)
			SELECT 'product.created', $8, id, version, `+pgProductJSON+`, $10 FROM p)
		SELECT id FROM p`,
		p.SKU, p.Name, p.Description, p.Category, p.PriceCents, p.Currency, p.Stock, now,
		searchText(p.Name, p.Description), nullable(actor)).Scan(&p.ID)
	if err != nil {
		return Product{}, fmt.Errorf("create product: %w", pgTranslate(ctx, err))
	}
	return p, nil
}

// adjustAlone is AdjustStock without a check, an Idempotency-Key or due
// lines in the way: the adjustment and its event in one statement. It
// reports false, having changed nothing, when the one statement cannot
// decide (no such product, short stock, or expired holds to release first),
// and the caller takes the transaction path.
func (s *postgresStore) adjustAlone(ctx context.Context, actor string, id, delta int64) (Product, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	now := s.nowMicro()
	p, err := scanProduct(s.pool.QueryRow(ctx, `WITH p AS (UPDATE products SET
			stock = stock + $1, version = version + 1, updated_at = $2
			WHERE id = $3 AND stock + $1 BETWEEN reserved AND 1000000000000
				AND NOT EXISTS (SELECT 1 FROM reservation_lines WHERE product_id = $3 AND holding = 1 AND expires_at <= $2)
			RETURNING *),
		e AS (INSERT INTO events (type, occurred_at, product_id, version, data, actor)
			SELECT 'stock.changed', $2, id, version, `+pgProductJSON+`, $4 FROM p)
		SELECT `+productColumns+` FROM p`, delta, now, id, nullable(actor)))
	if errors.Is(err, pgx.ErrNoRows) {
		return Product{}, false, nil
	}
	if err != nil {
		return Product{}, false, fmt.Errorf("adjust stock of product %d: %w", id, pgTranslate(ctx, err))
	}
	return p, true, nil
}

// pgTranslate turns pgx errors into domain errors at the storage boundary.
// ctx is the context the failed call ran under.
func pgTranslate(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	if e, ok := translateKnown(err); ok {
		return e
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case pe.Code == "23505": // unique_violation: the only unique column clients write is sku
			return fmt.Errorf("%w: %s", ErrConflict, "a product with this sku already exists")
		case strings.HasPrefix(pe.Code, "23"), strings.HasPrefix(pe.Code, "22"): // integrity, data exception
			return fmt.Errorf("%w: constraint violated", ErrInvalid)
		case pe.Code == "57014": // query_canceled: the client's cancellation, a deadline, statement_timeout
			if errors.Is(ctx.Err(), context.Canceled) {
				return context.Canceled
			}
			return &dbFailure{err}
		case strings.HasPrefix(pe.Code, "42"), strings.HasPrefix(pe.Code, "0A"): // syntax, undefined object: a bug
			return err
		}
		// Connection exceptions (08), resources (53), operator intervention
		// (57: shutdown, cannot connect now), system (58), internal (XX),
		// serialization failures that outlived their retries (40).
		return &dbFailure{err}
	}
	var ne net.Error
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) || errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, pgx.ErrTxClosed) || pgconn.Timeout(err) || strings.Contains(err.Error(), "closed pool") ||
		strings.Contains(err.Error(), "conn closed") {
		if errors.Is(err, context.Canceled) && ctx.Err() != nil {
			return context.Canceled
		}
		return &dbFailure{err}
	}
	return translateGeneric(ctx, err)
}

// pgQuerier runs statements written with ? placeholders on a transaction,
// a connection or the pool.
type pgQuerier struct{ q pgRunner }

// pgRunner is what pgx.Tx, *pgxpool.Conn and *pgxpool.Pool share.
type pgRunner interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

func (t pgQuerier) exec(ctx context.Context, query string, args ...any) (int64, error) {
	tag, err := t.q.Exec(ctx, dollars(query), args...)
	return tag.RowsAffected(), err
}

func (t pgQuerier) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	return pgNotFoundRow{t.q.QueryRow(ctx, dollars(query), args...)}
}

func (t pgQuerier) query(ctx context.Context, query string, args ...any) (sqlRows, error) {
	return t.q.Query(ctx, dollars(query), args...)
}

func (t pgQuerier) insert(ctx context.Context, query string, args ...any) (int64, error) {
	var id int64
	err := t.q.QueryRow(ctx, dollars(query+" RETURNING id"), args...).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		err = ErrNotFound
	}
	return id, err
}

// textChanged does nothing: the full-text vector is written with the row.
func (pgQuerier) textChanged(int64, *Product) {}

// pgNotFoundRow scans "no rows" as ErrNotFound.
type pgNotFoundRow struct{ row pgx.Row }

func (r pgNotFoundRow) Scan(dest ...any) error {
	err := r.row.Scan(dest...)
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrNotFound
	}
	return err
}

// dollarsCache holds each ? query rewritten with $n placeholders. The
// inventory code has a few dozen fixed queries, so it stays small.
var dollarsCache sync.Map

// dollars rewrites the ? placeholders of query as $1, $2, ... The queries
// are the service's own and have no ? inside literals.
func dollars(query string) string {
	if v, ok := dollarsCache.Load(query); ok {
		return v.(string)
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	dollarsCache.Store(query, b.String())
	return b.String()
}

// pgFeedLock is the advisory lock under which one sequencer at a time
// gives committed events their seq.
const pgFeedLock = 0x66656564 // "feed"

// sequenceEvents gives every committed event without a seq the next seqs,
// in insert order. Transactions here commit out of insert order, so a seq
// is given only once an event is committed and visible, by one sequencer
// at a time: a reader that saw seq N never later finds an event at or
// below N. It writes nothing when there is nothing to sequence.
func (s *postgresStore) sequenceEvents(ctx context.Context, conn *pgxpool.Conn) error {
	var pending bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM events WHERE seq IS NULL)`).Scan(&pending); err != nil || !pending {
		return err
	}
	return s.sequence(ctx, conn)
}

// sequenceBatch bounds the events one sequencing transaction numbers.
const sequenceBatch = 10000

// sequence numbers every event committed before it was called, in
// transactions of up to sequenceBatch events.
func (s *postgresStore) sequence(ctx context.Context, conn *pgxpool.Conn) error {
	for {
		var n int64
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(pgFeedLock)); err != nil {
				return err
			}
			// Seqs go on from the highest ever given: the highest kept, or the
			// trimmed-through mark when retention deleted every sequenced event
			// (else they would start again at 1, below positions readers hold).
			tag, err := tx.Exec(ctx, `UPDATE events SET seq = t.base + t.n
				FROM (SELECT e.id, row_number() OVER (ORDER BY e.id) AS n, b.base
					FROM (SELECT id FROM events WHERE seq IS NULL ORDER BY id LIMIT $1) AS e,
						(SELECT greatest(coalesce((SELECT max(seq) FROM events), 0),
							(SELECT trimmed_through FROM feed_state WHERE id = 1)) AS base) AS b) AS t
				WHERE events.id = t.id`, sequenceBatch)
			n = tag.RowsAffected()
			return err
		})
		if err != nil || n < sequenceBatch {
			return err
		}
	}
}

// headQuery reads whether events without a seq exist, the trimmed-through
// mark, and the head: the highest seq given, or the mark when retention
// deleted every event.
const headQuery = `SELECT EXISTS (SELECT 1 FROM events WHERE seq IS NULL), f.trimmed_through,
	greatest(coalesce((SELECT max(seq) FROM events), 0), f.trimmed_through)
	FROM feed_state f WHERE f.id = 1`

// Head returns the change log's head and whether committed events without
// a seq exist, in one read-only query.
func (s *postgresStore) Head(ctx context.Context) (int64, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var pending bool
	var head, trimmed int64
	if err := s.pool.QueryRow(ctx, headQuery).Scan(&pending, &trimmed, &head); err != nil {
		return 0, false, fmt.Errorf("change log head: %w", pgTranslate(ctx, err))
	}
	return head, pending, nil
}

// Changes returns the change log's head (the highest seq given, or the
// trimmed-through mark when retention deleted every event), then up to
// limit events: those after seq after in seq order, followed by the events
// of committed writes that have no seq yet. Together they hold every write
// committed before Changes was called that is not at or below after. It
// only reads: with nothing new it is one indexed query. It returns a
// *FeedGoneError when events after after were trimmed.
func (s *postgresStore) Changes(ctx context.Context, after int64, limit int) (int64, []Event, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return 0, nil, fmt.Errorf("change log: %w", pgTranslate(ctx, err))
	}
	defer conn.Release()
	var pending bool
	var head, trimmed int64
	err = conn.QueryRow(ctx, headQuery).Scan(&pending, &trimmed, &head)
	if err != nil {
		return 0, nil, fmt.Errorf("change log: %w", pgTranslate(ctx, err))
	}
	if after < trimmed {
		return 0, nil, &FeedGoneError{Oldest: trimmed + 1}
	}
	if !pending && head <= after {
		return head, nil, nil
	}
	// Run after the head was read: an event sequenced meanwhile has a seq
	// above head, so it is still here, by its seq.
	rows, err := pgQuerier{conn}.query(ctx, `SELECT `+eventColumns+` FROM events
		WHERE seq > ? OR seq IS NULL ORDER BY seq NULLS LAST, id LIMIT ?`, after, limit)
	if err != nil {
		return 0, nil, fmt.Errorf("change log: %w", pgTranslate(ctx, err))
	}
	es, err := scanEvents(rows)
	if err != nil {
		return 0, nil, fmt.Errorf("change log: %w", pgTranslate(ctx, err))
	}
	return head, es, nil
}

// Sequence gives every committed event its seq (see sequenceEvents).
func (s *postgresStore) Sequence(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	conn, err := s.pool.Acquire(ctx)
	if err == nil {
		err = s.sequenceEvents(ctx, conn)
		conn.Release()
	}
	if err != nil {
		return fmt.Errorf("sequence events: %w", pgTranslate(ctx, err))
	}
	return nil
}

// pgChannel is the LISTEN/NOTIFY channel on which replicas announce writes.
const pgChannel = "productsvc_changes"

// Listen holds one connection of its own (not the pool's) LISTENing on
// pgChannel and calls wake for every notification, until ctx ends. A broken
// connection is replaced after a second; wake is called after each
// (re)connect, since notifications sent meanwhile are lost.
//
// A failed connection is not reported: while the database is down the
// breakers say so, and the follower's periodic look covers the gap.
func (s *postgresStore) Listen(ctx context.Context, wake func(from string)) error {
	for {
		s.listen(ctx, wake)
		if ctx.Err() != nil {
			return nil
		}
		wake("")
		t := time.NewTimer(time.Second)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

func (s *postgresStore) listen(ctx context.Context, wake func(from string)) error {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	conn, err := pgx.ConnectConfig(cctx, s.pool.Config().ConnConfig)
	if err == nil {
		_, err = conn.Exec(cctx, `LISTEN `+pgChannel)
	}
	cancel()
	if conn != nil {
		defer conn.Close(context.WithoutCancel(ctx))
	}
	if err != nil {
		return err
	}
	wake("")
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		wake(n.Payload)
	}
}

// Notify wakes every replica's Listen.
func (s *postgresStore) Notify(ctx context.Context, from string) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if _, err := s.pool.Exec(ctx, `SELECT pg_notify($1, $2)`, pgChannel, from); err != nil {
		return fmt.Errorf("notify: %w", pgTranslate(ctx, err))
	}
	return nil
}

// Events returns up to limit events after seq after, in seq order, or a
// *FeedGoneError when retention trimmed some of them.
func (s *postgresStore) Events(ctx context.Context, after int64, limit int) ([]Event, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	// One connection for the whole read: under a write load every acquire
	// waits behind the writers, and a reader that queued four times per
	// page would fall behind them.
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("events: %w", pgTranslate(ctx, err))
	}
	defer conn.Release()
	if err := s.sequenceEvents(ctx, conn); err != nil {
		return nil, fmt.Errorf("events: %w", pgTranslate(ctx, err))
	}
	es, err := readEvents(ctx, tx{pgQuerier{conn}, pgDialect}, after, limit)
	if err != nil {
		return nil, fmt.Errorf("events: %w", pgTranslate(ctx, err))
	}
	return es, nil
}

// TrimEvents gives committed events their seq, then deletes those older
// than before; see trimAll. Only sequenced events are trimmed.
func (s *postgresStore) TrimEvents(ctx context.Context, before time.Time) (int64, error) {
	sctx, cancel := context.WithTimeout(ctx, s.timeout)
	conn, err := s.pool.Acquire(sctx)
	if err == nil {
		err = s.sequenceEvents(sctx, conn)
		conn.Release()
	}
	cancel()
	if err != nil {
		return 0, fmt.Errorf("trim events: %w", pgTranslate(ctx, err))
	}
	return s.sqlStore.TrimEvents(ctx, before)
}

// pgRelayLock is the advisory lock the publishing relay holds, so that one
// replica of a fleet publishes at a time.
const pgRelayLock = 0x72656c6179 // "relay"

// LockRelay waits for the relay's lease, until ctx ends: a session-level
// advisory lock held on a connection of its own, outside the pool. It tries
// the lock every relayLockRetry on that one connection (a waiting
// pg_advisory_lock would hold a snapshot, and so hold back vacuum, for as
// long as another replica publishes). The lock lasts as long as the
// connection: when this process dies, PostgreSQL ends its session and
// frees the lock.
func (s *postgresStore) LockRelay(ctx context.Context) (relayLease, error) {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	conn, err := pgx.ConnectConfig(cctx, s.pool.Config().ConnConfig)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("relay lock: %w", pgTranslate(ctx, err))
	}
	for {
		qctx, cancel := context.WithTimeout(ctx, s.timeout)
		var got bool
		err := conn.QueryRow(qctx, `SELECT pg_try_advisory_lock($1)`, int64(pgRelayLock)).Scan(&got)
		cancel()
		if err == nil && got {
			return &pgRelayLease{conn: conn, timeout: s.timeout}, nil
		}
		if err == nil {
			t := time.NewTimer(relayLockRetry)
			select {
			case <-ctx.Done():
				err = ctx.Err()
			case <-t.C:
			}
			t.Stop()
		}
		if err != nil {
			conn.Close(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("relay lock: %w", pgTranslate(ctx, err))
		}
	}
}

// pgRelayLease is the relay's lease on PostgreSQL. Its position moves on the
// lock's own connection: a relay whose connection (and so lock) is gone
// cannot move it.
type pgRelayLease struct {
	conn    *pgx.Conn
	timeout time.Duration
}

func (l *pgRelayLease) Move(ctx context.Context, from, to RelayPosition) error {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	err := moveRelay(ctx, tx{pgQuerier{l.conn}, pgDialect}, from, to)
	if err != nil && !errors.Is(err, errRelayMoved) {
		err = fmt.Errorf("move relay: %w", pgTranslate(ctx, err))
	}
	return err
}

// Check returns an error once the lock's connection is gone.
func (l *pgRelayLease) Check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, l.timeout)
	defer cancel()
	if err := l.conn.Ping(ctx); err != nil {
		return fmt.Errorf("relay lock: %w", pgTranslate(ctx, err))
	}
	return nil
}

// Release frees the lock by ending its session.
func (l *pgRelayLease) Release() {
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	l.conn.Close(ctx)
}
