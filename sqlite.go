package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// productColumns is the column list every product query selects, in the
// order scanProduct reads them.
const productColumns = `id, sku, name, description, category, price_cents, currency, stock, reserved, version, created_at, updated_at`

// qualifiedColumns is productColumns for queries that join other tables.
const qualifiedColumns = `products.id, products.sku, products.name, products.description, products.category,
	products.price_cents, products.currency, products.stock, products.reserved, products.version, products.created_at, products.updated_at`

// migrations are applied in order, each once, in one transaction each.
// Append only: a released migration never changes.
var migrations = []string{
	// 1: products, their sort indexes and the full-text index.
	`CREATE TABLE products (
		id          INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, so (id, version) is unique forever
		sku         TEXT    NOT NULL UNIQUE,
		name        TEXT    NOT NULL,
		description TEXT    NOT NULL DEFAULT '',
		category    TEXT    NOT NULL DEFAULT '',
		price_cents INTEGER NOT NULL CHECK (price_cents BETWEEN 0 AND 1000000000000),
		currency    TEXT    NOT NULL DEFAULT 'USD',
		stock       INTEGER NOT NULL DEFAULT 0 CHECK (stock BETWEEN 0 AND 1000000000000),
		version     INTEGER NOT NULL DEFAULT 1,
		created_at  INTEGER NOT NULL, -- Unix microseconds, UTC
		updated_at  INTEGER NOT NULL
	);
	CREATE INDEX products_name_id ON products (name, id);
	CREATE INDEX products_price_id ON products (price_cents, id);
	CREATE INDEX products_created_id ON products (created_at, id);
	CREATE INDEX products_category_id ON products (category, id);
	CREATE INDEX products_category_price_id ON products (category, price_cents, id);
	CREATE VIRTUAL TABLE products_fts USING fts5(
		name, description, content='products', content_rowid='id',
		tokenize='unicode61 remove_diacritics 2'
	);
	CREATE TRIGGER products_fts_insert AFTER INSERT ON products BEGIN
		INSERT INTO products_fts (rowid, name, description) VALUES (new.id, new.name, new.description);
	END;
	CREATE TRIGGER products_fts_delete AFTER DELETE ON products BEGIN
		INSERT INTO products_fts (products_fts, rowid, name, description) VALUES ('delete', old.id, old.name, old.description);
	END;
	CREATE TRIGGER products_fts_update AFTER UPDATE OF name, description ON products BEGIN
		INSERT INTO products_fts (products_fts, rowid, name, description) VALUES ('delete', old.id, old.name, old.description);
		INSERT INTO products_fts (rowid, name, description) VALUES (new.id, new.name, new.description);
	END;`,
	// 2: stored responses of writes made with an Idempotency-Key.
	`CREATE TABLE idempotency_keys (
		scope       TEXT    NOT NULL,
		key         TEXT    NOT NULL,
		fingerprint TEXT    NOT NULL,
		status      INTEGER NOT NULL,
		body        BLOB    NOT NULL,
		product_id  INTEGER NOT NULL,
		version     INTEGER NOT NULL,
		created_at  INTEGER NOT NULL, -- Unix microseconds
		PRIMARY KEY (scope, key)
	) WITHOUT ROWID;
	CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);`,
	// 3: a row the write breaker's probe rewrites to see if writes work again.
	`CREATE TABLE write_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);`,
	// 4: the writer maintains the full-text index once per group commit
	// (see ftsBatch) instead of triggers doing it row by row: FTS5 flushes
	// its pending index at every statement that touches it.
	`DROP TRIGGER products_fts_insert;
	DROP TRIGGER products_fts_delete;
	DROP TRIGGER products_fts_update;`,
	// 5: an idempotency record keeps the product its write produced; the
	// handler shapes the replayed response, so no status is stored.
	`ALTER TABLE idempotency_keys DROP COLUMN status;
	ALTER TABLE idempotency_keys RENAME COLUMN body TO product;`,
	// 6: reservations, and the change feed every write appends to. A line
	// repeats its hold's expiry and whether it still holds, so the units
	// held on a product are one indexed sum. reserved can never pass stock.
	`ALTER TABLE products ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0 CHECK (reserved BETWEEN 0 AND stock);
	CREATE TABLE reservations (
		id         TEXT    PRIMARY KEY,
		reference  TEXT    NOT NULL,
		state      TEXT    NOT NULL,
		created_at INTEGER NOT NULL,
		expires_at INTEGER NOT NULL,
		updated_at INTEGER NOT NULL
	) WITHOUT ROWID;
	CREATE INDEX reservations_reference ON reservations (reference, created_at);
	CREATE INDEX reservations_due ON reservations (expires_at) WHERE state = 'held';
	CREATE TABLE reservation_lines (
		reservation_id TEXT    NOT NULL,
		line           INTEGER NOT NULL,
		product_id     INTEGER NOT NULL,
		quantity       INTEGER NOT NULL,
		holding        INTEGER NOT NULL,
		expires_at     INTEGER NOT NULL,
		PRIMARY KEY (reservation_id, line)
	) WITHOUT ROWID;
	CREATE INDEX reservation_lines_holding ON reservation_lines (product_id, expires_at) WHERE holding = 1;
	CREATE TABLE events (
		seq            INTEGER PRIMARY KEY AUTOINCREMENT, -- commit order: one writer commits in order
		type           TEXT    NOT NULL,
		occurred_at    INTEGER NOT NULL,
		product_id     INTEGER,
		version        INTEGER,
		reservation_id TEXT,
		state          TEXT,
		data           BLOB
	);
	CREATE INDEX events_occurred ON events (occurred_at);
	CREATE TABLE feed_state (id INTEGER PRIMARY KEY CHECK (id = 1), trimmed_through INTEGER NOT NULL);
	INSERT INTO feed_state (id, trimmed_through) VALUES (1, 0);`,
}

// sqliteStore is the SQLite product store. It has one writer connection, fed by a
// single goroutine that commits concurrent writes in groups (one transaction
// and one fsync per group), and a pool of read-only connections.
type sqliteStore struct {
	write   *sql.DB
	unlock  func() // releases the file's process lock
	read    *sql.DB
	timeout time.Duration
	now     func() time.Time

	writes    chan *writeOp
	solo      chan *writeOp // writes committed each in a transaction of its own
	stop      chan struct{}
	loopDone  chan struct{}
	closeOnce sync.Once

	getStmt *sql.Stmt
	// Writer statements by SQL text, and those still to prepare; used by
	// the writer goroutine only.
	wstmts    map[string]*sql.Stmt
	toPrepare []string
	fts       ftsBatch
	stmtsMu   sync.Mutex
	stmts     map[string]*sql.Stmt // list queries by their SQL text

	count atomic.Int64 // number of products, kept up to date by writes

	groups, grouped atomic.Int64 // write groups committed, and the writes in them
}

// maxBatch bounds how many writes share one transaction.
const maxBatch = 128

// openSQLite opens (creating if needed) and migrates the database at cfg.Path.
func openSQLite(ctx context.Context, cfg StoreConfig) (*sqliteStore, error) {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.Sync == "" {
		cfg.Sync = "full"
	}
	if cfg.Readers <= 0 {
		cfg.Readers = max(4, 2*runtime.GOMAXPROCS(0))
	}
	busy := cfg.Timeout.Milliseconds()
	common := fmt.Sprintf("_pragma=busy_timeout(%d)&_pragma=foreign_keys(1)&_pragma=temp_store(memory)", busy)
	// A URI filename, so the readers can ask for mode=ro; escape what URI
	// syntax would read as its own.
	path := "file:" + strings.NewReplacer("%", "%25", "?", "%3f", "#", "%23").Replace(cfg.Path)

	// One process per file: every in-process cache and the maintained
	// count assume it (see lockDatabase).
	unlock, err := lockDatabase(cfg.Path)
	if err != nil {
		return nil, err
	}
	wdb, err := sql.Open("sqlite", path+"?"+common+
		"&_pragma=journal_mode(WAL)&_pragma=synchronous("+cfg.Sync+")&_txlock=immediate")
	if err != nil {
		unlock()
		return nil, fmt.Errorf("open database: %w", err)
	}
	wdb.SetMaxOpenConns(1)
	wdb.SetMaxIdleConns(1)
	wdb.SetConnMaxLifetime(0)
	wdb.SetConnMaxIdleTime(0)

	s := &sqliteStore{
		write:    wdb,
		unlock:   unlock,
		timeout:  cfg.Timeout,
		now:      time.Now,
		writes:   make(chan *writeOp, maxBatch),
		solo:     make(chan *writeOp),
		stop:     make(chan struct{}),
		loopDone: make(chan struct{}),
		stmts:    make(map[string]*sql.Stmt),
		wstmts:   make(map[string]*sql.Stmt),
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := s.migrate(ctx); err != nil {
		s.closeDBs()
		return nil, err
	}

	// Readers open the file read-only: a bug in a read path can never write.
	rdb, err := sql.Open("sqlite", path+"?mode=ro&"+common+"&_pragma=query_only(1)")
	if err != nil {
		s.closeDBs()
		return nil, fmt.Errorf("open database: %w", err)
	}
	rdb.SetMaxOpenConns(cfg.Readers)
	rdb.SetMaxIdleConns(cfg.Readers)
	rdb.SetConnMaxIdleTime(0)
	s.read = rdb

	if s.getStmt, err = rdb.PrepareContext(ctx, `SELECT `+productColumns+` FROM products WHERE id = ?`); err != nil {
		s.closeDBs()
		return nil, fmt.Errorf("prepare: %w", err)
	}
	var n int64
	if err := rdb.QueryRowContext(ctx, `SELECT count(*) FROM products`).Scan(&n); err != nil {
		s.closeDBs()
		return nil, fmt.Errorf("count products: %w", err)
	}
	s.count.Store(n)

	go s.writeLoop()
	return s, nil
}

func (s *sqliteStore) migrate(ctx context.Context) error {
	if _, err := s.write.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	var applied int
	if err := s.write.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&applied); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if err := checkSchemaVersion(applied, len(migrations)); err != nil {
		return err
	}
	for i, stmt := range migrations {
		version := i + 1
		err := func() error {
			tx, err := s.write.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			defer tx.Rollback()
			var applied int
			if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM schema_migrations WHERE version = ?`, version).Scan(&applied); err != nil {
				return err
			}
			if applied > 0 {
				return nil
			}
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`, version, time.Now().Unix()); err != nil {
				return err
			}
			return tx.Commit()
		}()
		if err != nil {
			return fmt.Errorf("migrate to version %d: %w", version, err)
		}
	}
	return nil
}

// Close stops the writer, checkpoints the WAL into the main file and closes
// every connection. Writes still queued get ErrUnavailable.
func (s *sqliteStore) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.stop)
		<-s.loopDone
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.read.Close() // readers first, so the writer's close is the last and removes the WAL
		if _, cerr := s.write.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); cerr != nil {
			err = fmt.Errorf("checkpoint: %w", cerr)
		}
		if cerr := s.write.Close(); cerr != nil && err == nil {
			err = cerr
		}
		s.unlock() // after the last connection: the next process finds the file quiet
	})
	return err
}

func (s *sqliteStore) closeDBs() {
	if s.read != nil {
		s.read.Close()
	}
	s.write.Close()
	s.unlock()
}

// Backend names the engine.
func (s *sqliteStore) Backend() string { return "sqlite" }

// Count returns the number of products, maintained by writes (no query).
func (s *sqliteStore) Count() int64 { return s.count.Load() }

// GroupStats returns how many write groups have committed and how many
// writes they held: their ratio is the average group size.
func (s *sqliteStore) GroupStats() (groups, writes int64) { return s.groups.Load(), s.grouped.Load() }

// Stats returns the read and write pools' statistics.
func (s *sqliteStore) Stats() (read, write sql.DBStats) { return s.read.Stats(), s.write.Stats() }

// Ping checks that a read connection can run a query.
func (s *sqliteStore) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var one int
	return translate(ctx, s.read.QueryRowContext(ctx, `SELECT 1`).Scan(&one))
}

// Get returns the product with id, or ErrNotFound.
func (s *sqliteStore) Get(ctx context.Context, id int64) (Product, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	p, err := scanProduct(s.getStmt.QueryRowContext(ctx, id))
	if err != nil {
		return Product{}, fmt.Errorf("get product %d: %w", id, translate(ctx, err))
	}
	return p, nil
}

type rowScanner interface{ Scan(dest ...any) error }

func scanProduct(row rowScanner) (Product, error) {
	var p Product
	var created, updated int64
	err := row.Scan(&p.ID, &p.SKU, &p.Name, &p.Description, &p.Category, &p.PriceCents,
		&p.Currency, &p.Stock, &p.Reserved, &p.Version, &created, &updated)
	p.CreatedAt = time.UnixMicro(created).UTC()
	p.UpdatedAt = time.UnixMicro(updated).UTC()
	return p, err
}

// List returns one page of products in keyset order.
func (s *sqliteStore) List(ctx context.Context, f ListFilter) (Page, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	query, args := listQuery(f)
	stmt, err := s.listStmt(ctx, query)
	if err != nil {
		return Page{}, fmt.Errorf("list products: %w", translate(ctx, err))
	}
	rows, err := stmt.QueryContext(ctx, args...)
	if err != nil {
		return Page{}, fmt.Errorf("list products: %w", translate(ctx, err))
	}
	defer rows.Close()
	items := make([]Product, 0, f.Limit+1)
	for rows.Next() {
		p, err := scanProduct(rows)
		if err != nil {
			return Page{}, fmt.Errorf("list products: %w", translate(ctx, err))
		}
		items = append(items, p)
	}
	if err := rows.Err(); err != nil {
		return Page{}, fmt.Errorf("list products: %w", translate(ctx, err))
	}
	var page Page
	if len(items) > f.Limit {
		items = items[:f.Limit]
		page.NextCursor = cursorAfter(f, items[len(items)-1]).encode()
	}
	page.Items = items
	return page, nil
}

// listStmt returns a prepared statement for query. The number of distinct
// queries is bounded by the combinations of filters and sorts (a few hundred).
func (s *sqliteStore) listStmt(ctx context.Context, query string) (*sql.Stmt, error) {
	s.stmtsMu.Lock()
	defer s.stmtsMu.Unlock()
	if st, ok := s.stmts[query]; ok {
		return st, nil
	}
	st, err := s.read.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	s.stmts[query] = st
	return st, nil
}

// listQuery builds the SQL for f. Every value is a bound parameter; only
// column names from the closed set in sortColumns reach the SQL text.
func listQuery(f ListFilter) (string, []any) {
	var where []string
	var args []any
	if f.Category != nil {
		where = append(where, "category = ?")
		args = append(args, *f.Category)
	}
	if f.MinPriceCents != nil {
		where = append(where, "price_cents >= ?")
		args = append(args, *f.MinPriceCents)
	}
	if f.MaxPriceCents != nil {
		where = append(where, "price_cents <= ?")
		args = append(args, *f.MaxPriceCents)
	}
	if f.InStock != nil {
		if *f.InStock {
			where = append(where, "stock > reserved") // available > 0
		} else {
			where = append(where, "stock <= reserved")
		}
	}
	col := sortColumns[f.Sort]
	from := "products"
	if len(f.Terms) > 0 {
		if col == "id" {
			// In id order, walk the full-text index in rowid order and stop
			// after the page, instead of collecting every match first.
			from = "products_fts JOIN products ON products.id = products_fts.rowid"
			where = append(where, "products_fts MATCH ?")
		} else {
			where = append(where, "id IN (SELECT rowid FROM products_fts WHERE products_fts MATCH ?)")
		}
		args = append(args, ftsMatch(f.Terms))
	}
	cmp, dir := ">", "ASC"
	if f.Desc {
		cmp, dir = "<", "DESC"
	}
	if f.After != nil {
		if col == "id" && len(f.Terms) > 0 {
			where = append(where, "products_fts.rowid "+cmp+" ?")
			args = append(args, f.After.ID)
		} else if col == "id" {
			where = append(where, "id "+cmp+" ?")
			args = append(args, f.After.ID)
		} else {
			where = append(where, "("+col+", id) "+cmp+" (?, ?)")
			args = append(args, f.After.Key, f.After.ID)
		}
	}
	var b strings.Builder
	b.WriteString("SELECT " + qualifiedColumns + " FROM " + from)
	if len(where) > 0 {
		b.WriteString(" WHERE " + strings.Join(where, " AND "))
	}
	if col == "id" && len(f.Terms) > 0 {
		b.WriteString(" ORDER BY products_fts.rowid " + dir)
	} else if col == "id" {
		b.WriteString(" ORDER BY id " + dir)
	} else {
		b.WriteString(" ORDER BY " + col + " " + dir + ", id " + dir)
	}
	b.WriteString(" LIMIT ?")
	args = append(args, f.Limit+1)
	return b.String(), args
}

// exec and queryRow run a statement in the writer's transaction, prepared
// once: parsing SQL is a large share of a small write's cost. A statement
// seen for the first time is prepared on the transaction and, once the
// transaction is over, prepared for good (preparing on the pool while the
// transaction holds its one connection would wait for itself).
func (s *sqliteStore) exec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	st, err := s.wstmt(ctx, tx, query)
	if err != nil {
		return nil, err
	}
	return st.ExecContext(ctx, args...)
}

func (s *sqliteStore) queryRow(ctx context.Context, tx *sql.Tx, query string, args ...any) rowScanner {
	st, err := s.wstmt(ctx, tx, query)
	if err != nil {
		return errRow{err}
	}
	return st.QueryRowContext(ctx, args...)
}

func (s *sqliteStore) wstmt(ctx context.Context, tx *sql.Tx, query string) (*sql.Stmt, error) {
	if st, ok := s.wstmts[query]; ok {
		return tx.StmtContext(ctx, st), nil
	}
	s.toPrepare = append(s.toPrepare, query)
	return tx.PrepareContext(ctx, query)
}

// prepareNew prepares the statements first seen in the last transaction.
func (s *sqliteStore) prepareNew() {
	for _, q := range s.toPrepare {
		if _, ok := s.wstmts[q]; ok {
			continue
		}
		if st, err := s.write.Prepare(q); err == nil {
			s.wstmts[q] = st
		}
	}
	s.toPrepare = s.toPrepare[:0]
}

// errRow is a row whose statement could not be prepared.
type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

// writeOp is one write waiting for the writer goroutine. fn runs inside its
// own savepoint of the group's transaction, so a failing write (a conflict,
// say) rolls back alone; onCommit, the store's own bookkeeping (the product
// count), runs on the writer goroutine after the group commits.
type writeOp struct {
	ctx      context.Context
	fn       func(ctx context.Context, tx *sql.Tx) error
	onCommit func()
	idem     *idemWrite
	done     chan error
}

// idemWrite records the product a write produced under its idempotency
// key, in the write's own savepoint: the write and its record commit
// together or not at all, so a retry after a crash can never apply the
// write twice.
type idemWrite struct {
	key    *IdempotencyKey
	result func() any                    // the Product or Reservation the write produced
	replay func([]byte) (*Replay, error) // reads a stored result back
}

// writeTx runs fn in the writer's next group transaction and returns once
// that transaction has committed (durably, with the configured sync) or
// failed. A write that was queued is waited for even if ctx ends, so the
// caller always learns its fate.
func (s *sqliteStore) writeTx(ctx context.Context, idem *idemWrite, fn func(ctx context.Context, tx *sql.Tx) error, onCommit func()) error {
	return s.submit(ctx, s.writes, &writeOp{ctx: ctx, fn: fn, onCommit: onCommit, idem: idem, done: make(chan error, 1)})
}

// writeAlone is writeTx for maintenance: fn runs in a transaction of its
// own, never in a group with client writes, so its cost and its failure are
// never theirs.
func (s *sqliteStore) writeAlone(ctx context.Context, fn func(ctx context.Context, tx *sql.Tx) error) error {
	return s.submit(ctx, s.solo, &writeOp{ctx: ctx, fn: fn, done: make(chan error, 1)})
}

// submit queues op on ch for the writer and waits for its outcome.
func (s *sqliteStore) submit(ctx context.Context, ch chan<- *writeOp, op *writeOp) error {
	select {
	case ch <- op:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.stop:
		return fmt.Errorf("store closed: %w", ErrUnavailable)
	}
	// With s.stop closed the send above can still win the select (the
	// channel is buffered), after the writer drained the queue and exited:
	// nobody would ever answer op. Stop waiting once the writer is gone.
	select {
	case err := <-op.done:
		return err
	case <-s.loopDone:
		select {
		case err := <-op.done:
			return err
		default:
			return fmt.Errorf("store closed: %w", ErrUnavailable)
		}
	}
}

func (s *sqliteStore) writeLoop() {
	defer close(s.loopDone)
	batch := make([]*writeOp, 0, maxBatch)
	for {
		select {
		case op := <-s.writes:
			batch = s.collect(append(batch[:0], op))
			s.commitGroup(batch)
			clear(batch)
			if len(s.toPrepare) > 0 {
				s.prepareNew()
			}
		case op := <-s.solo:
			s.commitGroup([]*writeOp{op})
			if len(s.toPrepare) > 0 {
				s.prepareNew()
			}
		case <-s.stop:
			// Fail whatever is still queued; writeTx callers are waiting.
			for {
				select {
				case op := <-s.writes:
					op.done <- fmt.Errorf("store closed: %w", ErrUnavailable)
				default:
					return
				}
			}
		}
	}
}

// collect adds the writes already queued to batch. Between rounds it yields
// the processor so that handlers about to queue a write can do so: under
// load the group grows and shares one commit, while a lone write waits for
// nothing (a yield with nothing else to run returns at once).
func (s *sqliteStore) collect(batch []*writeOp) []*writeOp {
	for round := 0; round < 4 && len(batch) < maxBatch; round++ {
		n := len(batch)
	drain:
		for len(batch) < maxBatch {
			select {
			case op := <-s.writes:
				batch = append(batch, op)
			default:
				break drain
			}
		}
		if len(batch) == n && round > 0 {
			break // a round found nothing new
		}
		runtime.Gosched()
	}
	return batch
}

// commitGroup runs ops in one transaction, each in a savepoint, and commits
// once. If the transaction itself fails, every op in it fails: none of them
// was acknowledged, and none is half-applied.
func (s *sqliteStore) commitGroup(ops []*writeOp) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	errs := make([]error, len(ops))
	s.fts.reset()
	failAll := func(err error) {
		err = translate(ctx, err)
		for _, op := range ops {
			op.done <- err
		}
	}
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		failAll(fmt.Errorf("begin: %w", err))
		return
	}
	defer tx.Rollback()
	for i, op := range ops {
		if err := op.ctx.Err(); err != nil {
			errs[i] = err // the client left before its write started: skip it
			continue
		}
		// A write refused by a check (not found, a conflict, short stock) is
		// refused before it writes, or by its first writing statement, which
		// SQLite backs out alone: every write is built that way, so after a
		// refusal nothing of it is left and the transaction goes on. What
		// follows that statement (the feed event, released lines) fails
		// only with the database, and then the whole group fails (below).
		// Only a write recording an idempotency key needs a savepoint, as a
		// replay is found after its record was looked up. Savepoints are not
		// free: releasing one makes FTS5 flush its pending index, which done
		// per write costs more than the write.
		savepoint := op.idem != nil
		mark := s.fts.mark()
		if savepoint {
			if _, err := s.exec(ctx, tx, `SAVEPOINT w`); err != nil {
				failAll(err)
				return
			}
		}
		opErr := translate(ctx, s.runOpRecover(ctx, tx, op))
		if _, ok := errors.AsType[*writePanic](opErr); ok && !savepoint {
			// It may have written half of itself, and only a savepoint could
			// take back just that: run the group again without it.
			tx.Rollback()
			op.done <- opErr
			s.commitGroup(slices.Delete(slices.Clone(ops), i, i+1))
			return
		}
		if opErr != nil {
			if errors.Is(opErr, ErrUnavailable) || !savepoint && !backedOut(opErr) {
				// A database failure may have rolled back the whole
				// transaction; an unexpected error may have left a write
				// half-done. Either way, nothing in this group commits.
				failAll(opErr)
				return
			}
			errs[i] = opErr
			s.fts.undo(mark)
			if savepoint {
				if _, err := s.exec(ctx, tx, `ROLLBACK TO w`); err != nil {
					failAll(err)
					return
				}
			}
		}
		if savepoint {
			if _, err := s.exec(ctx, tx, `RELEASE w`); err != nil {
				failAll(err)
				return
			}
		}
	}
	if err := s.fts.flush(ctx, s, tx); err != nil {
		failAll(fmt.Errorf("full-text index: %w", err))
		return
	}
	if err := tx.Commit(); err != nil {
		failAll(fmt.Errorf("commit: %w", err))
		return
	}
	s.groups.Add(1)
	s.grouped.Add(int64(len(ops)))
	for i, op := range ops {
		if errs[i] == nil && op.onCommit != nil {
			errs[i] = runOnCommit(op.onCommit)
		}
		op.done <- errs[i]
	}
}

// runOp runs one write, checking and recording its idempotency key. The
// writer goroutine runs one group at a time, so nothing races between the
// check and the record.
func (s *sqliteStore) runOp(ctx context.Context, tx *sql.Tx, op *writeOp) error {
	if op.idem == nil {
		return op.fn(ctx, tx)
	}
	k := op.idem.key
	cutoff := s.now().Add(-idempotencyTTL).UnixMicro()
	var fp string
	var snapshot []byte
	err := s.queryRow(ctx, tx, `SELECT fingerprint, product FROM idempotency_keys
		WHERE scope = ? AND key = ? AND created_at > ?`, k.Scope, k.Key, cutoff).Scan(&fp, &snapshot)
	switch {
	case err == nil:
		return replayOrMismatch(k, fp, snapshot, op.idem.replay)
	case !errors.Is(err, sql.ErrNoRows):
		return err
	}
	if err := op.fn(ctx, tx); err != nil {
		return err
	}
	v := op.idem.result()
	var productID, version int64 // kept for older binaries' sake; a reservation has neither
	if p, ok := v.(Product); ok {
		productID, version = p.ID, p.Version
	}
	_, err = s.exec(ctx, tx, `INSERT INTO idempotency_keys
		(scope, key, fingerprint, product, product_id, version, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint, product = excluded.product,
		product_id = excluded.product_id, version = excluded.version, created_at = excluded.created_at`,
		k.Scope, k.Key, k.Fingerprint, encodeSnapshot(v), productID, version, s.now().UnixMicro())
	return err
}

// writePanic is a panic in code run for one write on the writer goroutine.
// The write fails with it (a 500 for its client, the stack in the log) and
// the writer goes on with the others.
type writePanic struct {
	value any
	stack []byte
}

func (e *writePanic) Error() string { return fmt.Sprintf("panic in a write: %v", e.value) }

// runOpRecover is runOp with a panic turned into a *writePanic.
func (s *sqliteStore) runOpRecover(ctx context.Context, tx *sql.Tx, op *writeOp) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &writePanic{value: p, stack: debug.Stack()}
		}
	}()
	return s.runOp(ctx, tx, op)
}

// runOnCommit runs a committed write's callback, a panic in it turned into
// a *writePanic: the write has committed, but its caller cannot be told it
// succeeded when what follows the commit did not happen.
func runOnCommit(fn func()) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &writePanic{value: p, stack: debug.Stack()}
		}
	}()
	fn()
	return nil
}

// ProbeWrite makes one small real write, to learn whether writes work again
// after a failure (a full or read-only disk).
func (s *sqliteStore) ProbeWrite(ctx context.Context) error {
	return s.writeTx(ctx, nil, func(ctx context.Context, tx *sql.Tx) error {
		_, err := s.exec(ctx, tx, `INSERT INTO write_probe (id, at) VALUES (1, ?)
			ON CONFLICT (id) DO UPDATE SET at = excluded.at`, s.now().UnixMicro())
		return err
	}, nil)
}

// ExpireIdempotencyKeys deletes keys older than idempotencyTTL, in batches
// of expireBatch, each in a transaction of its own between client write
// groups: a backlog of any size neither fails nor stalls client writes. It
// returns how many keys it deleted, and stops early when ctx ends.
func (s *sqliteStore) ExpireIdempotencyKeys(ctx context.Context) (int64, error) {
	cutoff := s.now().Add(-idempotencyTTL).UnixMicro()
	var total int64
	for {
		var n int64
		err := s.writeAlone(ctx, func(ctx context.Context, tx *sql.Tx) error {
			res, err := s.exec(ctx, tx, `DELETE FROM idempotency_keys WHERE (scope, key) IN
				(SELECT scope, key FROM idempotency_keys WHERE created_at <= ? ORDER BY created_at LIMIT ?)`, cutoff, expireBatch)
			if err != nil {
				return err
			}
			n, err = res.RowsAffected()
			return err
		})
		total += n
		if err != nil {
			return total, fmt.Errorf("expire idempotency keys: %w", err)
		}
		if n < expireBatch {
			return total, nil
		}
	}
}

// Create inserts p and returns it with its id, version and timestamps.
// It returns ErrConflict if the SKU is taken.
func (s *sqliteStore) Create(ctx context.Context, p Product, idem *IdempotencyKey) (Product, error) {
	var out Product
	err := s.writeTx(ctx, idemRecord(idem, &out), func(ctx context.Context, tx *sql.Tx) error {
		now := s.nowMicro()
		// Only the id is read back: every other column is what was written.
		// A plain INSERT and last_insert_rowid cost less than RETURNING.
		res, err := s.exec(ctx, tx, `INSERT INTO products
			(sku, name, description, category, price_cents, currency, stock, version, created_at, updated_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)`,
			p.SKU, p.Name, p.Description, p.Category, p.PriceCents, p.Currency, p.Stock, now.UnixMicro(), now.UnixMicro())
		if err != nil {
			return err
		}
		if p.ID, err = res.LastInsertId(); err != nil {
			return err
		}
		p.Version, p.Reserved, p.CreatedAt, p.UpdatedAt = 1, 0, now, now
		out = p
		s.fts.created(out.ID)
		return appendEvent(ctx, sqliteTx{s, tx}, now, EventProductCreated, &out, nil)
	}, func() { s.count.Add(1) })
	if err != nil {
		return Product{}, fmt.Errorf("create product: %w", err)
	}
	return out, nil
}

// nowMicro is the store's clock, at the microsecond both engines keep.
func (s *sqliteStore) nowMicro() time.Time { return s.now().UTC().Truncate(time.Microsecond) }

// Update applies change to the product with id inside the write transaction
// and stores the result with the next version. change sees the current
// product and returns ErrPrecondition, a validation error or errUnchanged
// (nothing to write: the current product is returned as it is). Update
// returns ErrNotFound, ErrConflict (SKU taken), ErrInsufficientStock (stock
// below what open holds keep) or change's error.
func (s *sqliteStore) Update(ctx context.Context, id int64, change func(*Product) error) (Product, error) {
	var out Product
	err := s.writeTx(ctx, nil, func(ctx context.Context, tx *sql.Tx) error {
		cur, err := scanProduct(s.queryRow(ctx, tx, `SELECT `+productColumns+` FROM products WHERE id = ?`, id))
		if err != nil {
			return err
		}
		next := cur
		if err := change(&next); err != nil {
			if errors.Is(err, errUnchanged) {
				out = cur
				return nil
			}
			return err
		}
		now := s.nowMicro()
		itx := sqliteTx{s, tx}
		due, err := dueUnits(ctx, itx, now, id)
		if err != nil {
			return err
		}
		if next.Stock < cur.Reserved-due {
			return ErrInsufficientStock
		}
		// Every check is above: from here a failure is the database's, and
		// fails the group (see commitGroup).
		out, err = scanProduct(s.queryRow(ctx, tx, `UPDATE products SET
			sku = ?, name = ?, description = ?, category = ?, price_cents = ?, currency = ?, stock = ?,
			reserved = reserved - ?, version = version + 1, updated_at = ?
			WHERE id = ? RETURNING `+productColumns,
			next.SKU, next.Name, next.Description, next.Category, next.PriceCents, next.Currency, next.Stock,
			due, now.UnixMicro(), id))
		if err != nil {
			return err // a taken sku: the one statement is backed out
		}
		if cur.Name != out.Name || cur.Description != out.Description {
			s.fts.changed(cur)
		}
		if due > 0 {
			if err := releaseDueLines(ctx, itx, now, id); err != nil {
				return err
			}
		}
		return appendEvent(ctx, itx, now, updateEvent(cur, next), &out, nil)
	}, nil)
	if err != nil {
		return Product{}, fmt.Errorf("update product %d: %w", id, err)
	}
	return out, nil
}

func idemRecord(k *IdempotencyKey, out *Product) *idemWrite {
	if k == nil {
		return nil
	}
	return &idemWrite{key: k, result: func() any { return *out }, replay: productReplay}
}

// AdjustStock adds delta to the stock of the product with id in one
// statement, so concurrent adjustments never lose an update. check, if not
// nil, sees the current version first (If-Match). It returns ErrNotFound,
// check's error, or ErrInsufficientStock if the stock would go below what
// open holds keep (or above the maximum), in which case nothing changes.
func (s *sqliteStore) AdjustStock(ctx context.Context, id, delta int64, check func(version int64) error, idem *IdempotencyKey) (Product, error) {
	var out Product
	err := s.writeTx(ctx, idemRecord(idem, &out), func(ctx context.Context, tx *sql.Tx) error {
		now := s.nowMicro()
		itx := sqliteTx{s, tx}
		if check != nil {
			var version int64
			if err := s.queryRow(ctx, tx, `SELECT version FROM products WHERE id = ?`, id).Scan(&version); err != nil {
				return err
			}
			if err := check(version); err != nil {
				return err
			}
		}
		due, err := dueUnits(ctx, itx, now, id)
		if err != nil {
			return err
		}
		out, err = scanProduct(s.queryRow(ctx, tx, `UPDATE products SET
			stock = stock + ?1, reserved = reserved - ?4, version = version + 1, updated_at = ?2
			WHERE id = ?3 AND stock + ?1 BETWEEN reserved - ?4 AND 1000000000000
			RETURNING `+productColumns, delta, now.UnixMicro(), id, due))
		if errors.Is(err, sql.ErrNoRows) {
			var exists int
			if err := s.queryRow(ctx, tx, `SELECT 1 FROM products WHERE id = ?`, id).Scan(&exists); err != nil {
				return err // ErrNoRows: not found
			}
			return ErrInsufficientStock
		}
		if err != nil {
			return err
		}
		if due > 0 {
			if err := releaseDueLines(ctx, itx, now, id); err != nil {
				return err
			}
		}
		return appendEvent(ctx, itx, now, EventStockChanged, &out, nil)
	}, nil)
	if err != nil {
		return Product{}, fmt.Errorf("adjust stock of product %d: %w", id, err)
	}
	return out, nil
}

// Delete removes the product with id and returns it as it was. check, if
// not nil, sees the current product first and may refuse with
// ErrPrecondition. Delete returns ErrNotFound if there is no such product,
// and ErrReserved while open holds name it.
func (s *sqliteStore) Delete(ctx context.Context, id int64, check func(Product) error) (Product, error) {
	var gone Product
	err := s.writeTx(ctx, nil, func(ctx context.Context, tx *sql.Tx) error {
		cur, err := scanProduct(s.queryRow(ctx, tx, `SELECT `+productColumns+` FROM products WHERE id = ?`, id))
		if err != nil {
			return err
		}
		if check != nil {
			if err := check(cur); err != nil {
				return err
			}
		}
		now := s.nowMicro()
		itx := sqliteTx{s, tx}
		due, err := dueUnits(ctx, itx, now, id)
		if err != nil {
			return err
		}
		if cur.Reserved-due > 0 {
			return ErrReserved
		}
		gone = cur
		if _, err = s.exec(ctx, tx, `DELETE FROM products WHERE id = ?`, id); err != nil {
			return err
		}
		s.fts.changed(cur)
		if due > 0 {
			if err := releaseDueLines(ctx, itx, now, id); err != nil {
				return err
			}
		}
		return appendEvent(ctx, itx, now, EventProductDeleted, &gone, nil)
	}, func() { s.count.Add(-1) })
	if err != nil {
		return Product{}, fmt.Errorf("delete product %d: %w", id, err)
	}
	return gone, nil
}

// Reserve holds r's lines for ttl, all or nothing; see postgresStore.Reserve.
func (s *sqliteStore) Reserve(ctx context.Context, r Reservation, ttl time.Duration, idem *IdempotencyKey) (Reservation, []Product, error) {
	var out Reservation
	var changed []Product
	var record *idemWrite
	if idem != nil {
		record = &idemWrite{key: idem, result: func() any { return out }, replay: reservationReplay}
	}
	err := s.writeTx(ctx, record, func(ctx context.Context, tx *sql.Tx) error {
		var err error
		out, changed, err = reserve(ctx, sqliteTx{s, tx}, s.nowMicro(), r, ttl)
		return err
	}, nil)
	if err != nil {
		return Reservation{}, nil, fmt.Errorf("reserve: %w", err)
	}
	return out, changed, nil
}

// Transition moves reservation id to state to; see transition.
func (s *sqliteStore) Transition(ctx context.Context, id, to string) (Reservation, []Product, error) {
	var out Reservation
	var changed []Product
	err := s.writeTx(ctx, nil, func(ctx context.Context, tx *sql.Tx) error {
		var err error
		out, changed, err = transition(ctx, sqliteTx{s, tx}, s.nowMicro(), id, to)
		return err
	}, nil)
	if err != nil {
		return Reservation{}, nil, fmt.Errorf("reservation %s: %w", id, err)
	}
	return out, changed, nil
}

// Events returns up to limit events after seq after, in seq order, or a
// *FeedGoneError when retention trimmed some of them. The one writer
// commits in seq order, so what a reader sees has no gaps.
func (s *sqliteStore) Events(ctx context.Context, after int64, limit int) ([]Event, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	es, err := readEvents(ctx, sqliteRead{s.read}, after, limit)
	if err != nil {
		return nil, fmt.Errorf("events: %w", translate(ctx, err))
	}
	return es, nil
}

// ftsBatch collects the full-text index changes of one group commit, which
// flush applies in two statements just before the commit. For each product
// touched in the group it keeps the indexed text as it was before the group
// (none for a product created in it): the index is told to delete exactly
// what it holds, then to add what the products table holds at the end.
type ftsBatch struct {
	before  map[int64]*Product // nil value: created in this group
	journal []int64            // ids in the order they were first touched
}

func (b *ftsBatch) reset() {
	if b.before == nil {
		b.before = make(map[int64]*Product)
	}
	clear(b.before)
	b.journal = b.journal[:0]
}

func (b *ftsBatch) created(id int64) { b.touch(id, nil) }

// changed records that the text of old (as committed before) changes.
func (b *ftsBatch) changed(old Product) { b.touch(old.ID, &old) }

func (b *ftsBatch) touch(id int64, old *Product) {
	if _, ok := b.before[id]; ok {
		return // the first state in the group is the one the index holds
	}
	b.before[id] = old
	b.journal = append(b.journal, id)
}

// mark and undo forget the changes of a write that was rolled back.
func (b *ftsBatch) mark() int { return len(b.journal) }

func (b *ftsBatch) undo(mark int) {
	for _, id := range b.journal[mark:] {
		delete(b.before, id)
	}
	b.journal = b.journal[:mark]
}

type ftsRow struct {
	ID          int64  `json:"id"`
	Name        string `json:"name"`
	Description string `json:"description"`
}

func (b *ftsBatch) flush(ctx context.Context, s *sqliteStore, tx *sql.Tx) error {
	if len(b.journal) == 0 {
		return nil
	}
	var dels []ftsRow
	for _, id := range b.journal {
		if old := b.before[id]; old != nil {
			dels = append(dels, ftsRow{old.ID, old.Name, old.Description})
		}
	}
	if len(dels) > 0 {
		js, _ := json.Marshal(dels)
		if _, err := s.exec(ctx, tx, `INSERT INTO products_fts (products_fts, rowid, name, description)
			SELECT 'delete', value ->> '$.id', value ->> '$.name', value ->> '$.description' FROM json_each(?)`, string(js)); err != nil {
			return err
		}
	}
	ids, _ := json.Marshal(b.journal)
	_, err := s.exec(ctx, tx, `INSERT INTO products_fts (rowid, name, description)
		SELECT id, name, description FROM products WHERE id IN (SELECT value FROM json_each(?))`, string(ids))
	return err
}

// translate turns SQLite driver errors into domain errors at the storage
// boundary. ctx is the context the failed call ran under: a deadline there
// is a database failure, a cancellation is the client's doing and is not.
func translate(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if e, ok := translateKnown(err); ok {
		return e
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff {
		case sqlite3.SQLITE_CONSTRAINT:
			if se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY {
				return fmt.Errorf("%w: %s", ErrConflict, "a product with this sku already exists")
			}
			return fmt.Errorf("%w: constraint violated", ErrInvalid)
		case sqlite3.SQLITE_INTERRUPT:
			if ctx.Err() == nil || errors.Is(context.Cause(ctx), context.Canceled) {
				return context.Canceled
			}
			return &dbFailure{err}
		case sqlite3.SQLITE_ERROR:
			// A logic error (bad SQL, a bad FTS query) is a bug, not an outage.
			return err
		}
		return &dbFailure{err}
	}
	return translateGeneric(ctx, err)
}

// sqliteTx runs the inventory code's statements in the writer's
// transaction, prepared once like the writer's own.
type sqliteTx struct {
	s  *sqliteStore
	tx *sql.Tx
}

func (t sqliteTx) exec(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := t.s.exec(ctx, t.tx, query, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

func (t sqliteTx) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	return notFoundRow{t.s.queryRow(ctx, t.tx, query, args...)}
}

func (t sqliteTx) query(ctx context.Context, query string, args ...any) (invRows, error) {
	st, err := t.s.wstmt(ctx, t.tx, query)
	if err != nil {
		return nil, err
	}
	rows, err := st.QueryContext(ctx, args...)
	if err != nil {
		return nil, err
	}
	return sqlRows{rows}, nil
}

func (sqliteTx) lock() string                            { return "" }
func (sqliteTx) ts(t time.Time) any                      { return t.UnixMicro() }
func (sqliteTx) product(row rowScanner) (Product, error) { return scanProduct(row) }

// sqliteRead runs the inventory code's reads on the read-only pool.
type sqliteRead struct{ db *sql.DB }

func (r sqliteRead) exec(context.Context, string, ...any) (int64, error) {
	return 0, errors.New("write on the read-only pool")
}

func (r sqliteRead) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	return notFoundRow{r.db.QueryRowContext(ctx, query, args...)}
}

func (r sqliteRead) query(ctx context.Context, query string, args ...any) (invRows, error) {
	rows, err := r.db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return sqlRows{rows}, nil
}

func (sqliteRead) lock() string                            { return "" }
func (sqliteRead) ts(t time.Time) any                      { return t.UnixMicro() }
func (sqliteRead) product(row rowScanner) (Product, error) { return scanProduct(row) }

// notFoundRow scans "no rows" as ErrNotFound.
type notFoundRow struct{ row rowScanner }

func (r notFoundRow) Scan(dest ...any) error {
	err := r.row.Scan(dest...)
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNotFound
	}
	return err
}

// sqlRows is *sql.Rows as invRows.
type sqlRows struct{ *sql.Rows }

func (r sqlRows) Close() { r.Rows.Close() }

// The inventory code's view of this engine (see invStore).
func (s *sqliteStore) invRead() invTx                                    { return sqliteRead{s.read} }
func (s *sqliteStore) opTimeout() time.Duration                          { return s.timeout }
func (s *sqliteStore) invTranslate(ctx context.Context, err error) error { return translate(ctx, err) }

// invAlone runs fn in a transaction of its own, between client write
// groups: maintenance never shares their fate.
func (s *sqliteStore) invAlone(ctx context.Context, fn func(ctx context.Context, tx invTx) error) error {
	return s.writeAlone(ctx, func(ctx context.Context, tx *sql.Tx) error { return fn(ctx, sqliteTx{s, tx}) })
}

// Reservation returns reservation id, or ErrReservationNotFound.
func (s *sqliteStore) Reservation(ctx context.Context, id string) (Reservation, error) {
	return getReservation(ctx, s, id)
}

// ReservationsByReference returns the newest reservations under ref.
func (s *sqliteStore) ReservationsByReference(ctx context.Context, ref string, limit int) ([]Reservation, error) {
	return listByReference(ctx, s, ref, limit)
}

// ExpireReservations records up to limit due holds as expired; see
// expireReservations.
func (s *sqliteStore) ExpireReservations(ctx context.Context, limit int) (int, []Product, error) {
	return expireReservations(ctx, s, limit)
}

// TrimEvents deletes events older than before; see trimAll.
func (s *sqliteStore) TrimEvents(ctx context.Context, before time.Time) (int64, error) {
	return trimAll(ctx, s, before)
}
