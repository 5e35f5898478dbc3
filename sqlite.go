package main

// The SQLite engine: the embedded default. One process holds the file
// (lockDatabase); one writer connection, fed by the group-commit writer
// (sqlite_writer.go), and a pool of read-only connections. The SQL is
// sqlStore's; this file holds what is SQLite's own: opening, migrating,
// the dialect, reads on prepared statements, and error translation.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// migrations are SQLite's numbered migrations (migrations/sqlite), applied
// in order, each once, in one transaction each.
var migrations = migrationsOf("sqlite")

// sqliteDialect is how SQLite's statements differ: times are Unix
// microseconds, and the full-text index is an FTS5 table the writer keeps
// (see ftsBatch), matched with quoted prefix terms.
var sqliteDialect = newDialect(dialect{
	ts: func(t time.Time) any { return t.UnixMicro() },
	fullText: func(terms []string, byID bool) (string, string, any, string) {
		if byID {
			// In id order, walk the full-text index in rowid order and stop
			// after the page, instead of collecting every match first.
			return "products_fts JOIN products ON products.id = products_fts.rowid", "products_fts MATCH ?",
				ftsMatch(terms), "products_fts.rowid"
		}
		return "products", "products.id IN (SELECT rowid FROM products_fts WHERE products_fts MATCH ?)",
			ftsMatch(terms), "products.id"
	},
})

// sqliteStore is the SQLite product store. It has one writer connection, fed
// by a single goroutine that commits concurrent writes in groups (one
// transaction and one fsync per group), and a pool of read-only connections.
type sqliteStore struct {
	sqlStore
	path   string  // the database file
	wdb    *sql.DB // the one write connection, the writer's
	unlock func()  // releases the file's process lock
	rdb    *sql.DB // read-only connections
	reads  sqliteRead

	writer                  // the group-commit writer (sqlite_writer.go)
	mergeDone chan struct{} // closed when ftsMergeLoop returns
	closeOnce sync.Once

	count atomic.Int64 // number of products, kept up to date by writes
}

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

	s := &sqliteStore{path: cfg.Path, wdb: wdb, unlock: unlock}
	s.sqlStore = sqlStore{eng: s, d: sqliteDialect, timeout: cfg.Timeout, now: time.Now, counted: func(n int64) { s.count.Add(n) }, keepUnpublished: cfg.KeepUnpublished}
	s.writer = newWriter(wdb, cfg.Timeout, func() time.Time { return s.now() })
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
	s.rdb = rdb
	s.reads = sqliteRead{db: rdb, stmts: new(sync.Map)}

	// The full-text index's segments are merged by ftsMergeLoop, a little
	// at a time, not by FTS5's automerge inside a client's commit (see
	// ftsMergeLoop). The setting is kept in the database; set it at every
	// open, so a database from before this keeps no automerge either.
	if _, err := s.wdb.ExecContext(ctx, `INSERT INTO products_fts (products_fts, rank) VALUES ('automerge', 0)`); err != nil {
		s.closeDBs()
		return nil, fmt.Errorf("full-text index settings: %w", err)
	}

	var n int64
	if err := rdb.QueryRowContext(ctx, `SELECT count(*) FROM products`).Scan(&n); err != nil {
		s.closeDBs()
		return nil, fmt.Errorf("count products: %w", err)
	}
	s.count.Store(n)

	go s.writeLoop()
	s.mergeDone = make(chan struct{})
	go func() {
		defer close(s.mergeDone)
		s.ftsMergeLoop(ftsMergeInterval)
	}()
	return s, nil
}

func (s *sqliteStore) migrate(ctx context.Context) error {
	if _, err := s.wdb.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	var applied int
	if err := s.wdb.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&applied); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if err := checkSchemaVersion(applied, len(migrations)); err != nil {
		return err
	}
	for i, stmt := range migrations {
		version := i + 1
		err := func() error {
			tx, err := s.wdb.BeginTx(ctx, nil)
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
		s.stopWriter()
		<-s.mergeDone // ends with the writer
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.rdb.Close() // readers first, so the writer's close is the last and removes the WAL
		if _, cerr := s.wdb.ExecContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`); cerr != nil {
			err = fmt.Errorf("checkpoint: %w", cerr)
		}
		if cerr := s.wdb.Close(); cerr != nil && err == nil {
			err = cerr
		}
		s.unlock() // after the last connection: the next process finds the file quiet
	})
	return err
}

func (s *sqliteStore) closeDBs() {
	if s.rdb != nil {
		s.rdb.Close()
	}
	s.wdb.Close()
	s.unlock()
}

// Backend names the engine.
func (s *sqliteStore) Backend() string { return "sqlite" }

// Count returns the number of products, maintained by writes (no query).
func (s *sqliteStore) Count() int64 { return s.count.Load() }

// Stats returns the read and write pools' statistics.
func (s *sqliteStore) Stats() (read, write sql.DBStats) { return s.rdb.Stats(), s.wdb.Stats() }

// The engine's side of sqlStore.
func (s *sqliteStore) reader() querier { return s.reads }

func (s *sqliteStore) translate(ctx context.Context, err error) error { return translate(ctx, err) }

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

// sqliteRead runs reads on the read-only pool, each statement prepared once
// per SQL text: parsing SQL is a large share of a point read's cost. The
// texts are the store's own (listings: a few hundred combinations of
// filters and sorts), so the map stays small.
type sqliteRead struct {
	db    *sql.DB
	stmts *sync.Map // SQL text → *sql.Stmt
}

func (r sqliteRead) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	if st, ok := r.stmts.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := r.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if prev, loaded := r.stmts.LoadOrStore(query, st); loaded {
		st.Close()
		return prev.(*sql.Stmt), nil
	}
	return st, nil
}

func (r sqliteRead) exec(context.Context, string, ...any) (int64, error) {
	return 0, errors.New("write on the read-only pool")
}

func (r sqliteRead) insert(context.Context, string, ...any) (int64, error) {
	return 0, errors.New("write on the read-only pool")
}

func (sqliteRead) textChanged(int64, *Product) {}

func (r sqliteRead) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	st, err := r.stmt(ctx, query)
	if err != nil {
		return errRow{err}
	}
	return notFoundRow{st.QueryRowContext(ctx, args...)}
}

func (r sqliteRead) query(ctx context.Context, query string, args ...any) (sqlRows, error) {
	st, err := r.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	rows, err := st.QueryContext(ctx, args...)
	if err != nil {
		return nil, err
	}
	return stdRows{rows}, nil
}

// notFoundRow scans "no rows" as ErrNotFound.
type notFoundRow struct{ row rowScanner }

func (r notFoundRow) Scan(dest ...any) error {
	err := r.row.Scan(dest...)
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNotFound
	}
	return err
}

// errRow is a row whose statement could not be prepared.
type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

// stdRows is *sql.Rows as sqlRows.
type stdRows struct{ *sql.Rows }

func (r stdRows) Close() { r.Rows.Close() }

// LockRelay returns the relay's lease. One process holds a SQLite file
// (see filelock.go), so there is one relay and the lease is never taken.
func (s *sqliteStore) LockRelay(ctx context.Context) (relayLease, error) {
	return sqliteRelayLease{s}, nil
}

// sqliteRelayLease moves the relay's position between client writes.
type sqliteRelayLease struct{ s *sqliteStore }

func (l sqliteRelayLease) Move(ctx context.Context, from, to RelayPosition) error {
	ctx, cancel := context.WithTimeout(ctx, l.s.timeout)
	defer cancel()
	err := l.s.eng.alone(ctx, func(ctx context.Context, q querier) error { return moveRelay(ctx, tx{q, l.s.d}, from, to) })
	if err != nil && !errors.Is(err, errRelayMoved) {
		err = l.s.translate(ctx, err)
	}
	return err
}

func (sqliteRelayLease) Check(context.Context) error { return nil }
func (sqliteRelayLease) Release()                    {}
