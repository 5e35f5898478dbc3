package main

// SQLite's group-commit writer: one goroutine owns the one write connection
// and commits the writes queued meanwhile in one transaction and one fsync,
// each write in a savepoint of its own; and the full-text index it keeps
// once per group (ftsBatch).

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"sync/atomic"
	"time"
)

// maxBatch bounds how many writes share one transaction.
const maxBatch = 128

// writer is the goroutine that runs every write of a sqliteStore. Its fields
// past the channels are touched by that goroutine only.
type writer struct {
	db           *sql.DB
	groupTimeout time.Duration    // bound on one group's transaction
	clock        func() time.Time // the store's clock, for idempotency records

	writes   chan *writeOp
	solo     chan *writeOp // writes committed each in a transaction of its own
	stop     chan struct{}
	loopDone chan struct{}

	// Statements by SQL text, and those still to prepare.
	wstmts    map[string]*sql.Stmt
	toPrepare []string
	fts       ftsBatch

	groups, grouped atomic.Int64 // write groups committed, and the writes in them
	ftsGroups       atomic.Int64 // groups committed that changed the full-text index
}

func newWriter(db *sql.DB, timeout time.Duration, clock func() time.Time) writer {
	return writer{
		db: db, groupTimeout: timeout, clock: clock,
		writes:   make(chan *writeOp, maxBatch),
		solo:     make(chan *writeOp),
		stop:     make(chan struct{}),
		loopDone: make(chan struct{}),
		wstmts:   make(map[string]*sql.Stmt),
	}
}

// writeOp is one write waiting for the writer goroutine. fn runs inside its
// own savepoint of the group's transaction.
type writeOp struct {
	ctx    context.Context
	fn     func(ctx context.Context, q querier) ([]byte, error)
	key    *IdempotencyKey
	replay []byte // set when key was used before: fn did not run
	done   chan error
}

// write runs fn in the writer's next group transaction and returns once
// that transaction has committed (durably, with the configured sync) or fn
// failed, having changed nothing. A write that was queued is waited for even
// if ctx ends, so the caller always learns its fate. See engine.write.
func (w *writer) write(ctx context.Context, key *IdempotencyKey, fn func(ctx context.Context, q querier) ([]byte, error)) ([]byte, error) {
	op := &writeOp{ctx: ctx, fn: fn, key: key, done: make(chan error, 1)}
	if err := w.submit(ctx, w.writes, op); err != nil {
		return nil, err
	}
	return op.replay, nil
}

// alone is write for maintenance: fn runs in a transaction of its own,
// never in a group with client writes, so its cost and its failure are
// never theirs.
func (w *writer) alone(ctx context.Context, fn func(ctx context.Context, q querier) error) error {
	return w.submit(ctx, w.solo, &writeOp{ctx: ctx, done: make(chan error, 1),
		fn: func(ctx context.Context, q querier) ([]byte, error) { return nil, fn(ctx, q) }})
}

// submit queues op on ch for the writer and waits for its outcome.
func (w *writer) submit(ctx context.Context, ch chan<- *writeOp, op *writeOp) error {
	select {
	case ch <- op:
	case <-ctx.Done():
		return ctx.Err()
	case <-w.stop:
		return fmt.Errorf("store closed: %w", ErrUnavailable)
	}
	// With w.stop closed the send above can still win the select (the
	// channel is buffered), after the writer drained the queue and exited:
	// nobody would ever answer op. Stop waiting once the writer is gone.
	select {
	case err := <-op.done:
		return err
	case <-w.loopDone:
		select {
		case err := <-op.done:
			return err
		default:
			return fmt.Errorf("store closed: %w", ErrUnavailable)
		}
	}
}

// stopWriter stops the writer goroutine; writes still queued fail.
func (w *writer) stopWriter() {
	close(w.stop)
	<-w.loopDone
}

// GroupStats returns how many write groups have committed and how many
// writes they held: their ratio is the average group size.
func (w *writer) GroupStats() (groups, writes int64) { return w.groups.Load(), w.grouped.Load() }

func (w *writer) writeLoop() {
	defer close(w.loopDone)
	batch := make([]*writeOp, 0, maxBatch)
	for {
		select {
		case op := <-w.writes:
			batch = w.collect(append(batch[:0], op))
			w.commitGroup(batch)
			clear(batch)
		case op := <-w.solo:
			w.commitGroup([]*writeOp{op})
		case <-w.stop:
			// Fail whatever is still queued; write callers are waiting.
			for {
				select {
				case op := <-w.writes:
					op.done <- fmt.Errorf("store closed: %w", ErrUnavailable)
				default:
					return
				}
			}
		}
		if len(w.toPrepare) > 0 {
			w.prepareNew()
		}
	}
}

// collect adds the writes already queued to batch. Between rounds it yields
// the processor so that handlers about to queue a write can do so: under
// load the group grows and shares one commit, while a lone write waits for
// nothing (a yield with nothing else to run returns at once).
func (w *writer) collect(batch []*writeOp) []*writeOp {
	for round := 0; round < 4 && len(batch) < maxBatch; round++ {
		n := len(batch)
	drain:
		for len(batch) < maxBatch {
			select {
			case op := <-w.writes:
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

// commitGroup runs ops in one transaction and commits once. Every write runs
// in a savepoint of its own, so whatever it fails with — a refusal, a bug, a
// panic — takes back exactly that write and fails it alone: by construction,
// not by a list of errors known to leave nothing behind. Only a failure of
// the database itself (which may have ended the transaction) or of the
// transaction's own statements fails every op in the group: none of them was
// acknowledged, and none is half-applied.
func (w *writer) commitGroup(ops []*writeOp) {
	ctx, cancel := context.WithTimeout(context.Background(), w.groupTimeout)
	defer cancel()
	errs := make([]error, len(ops))
	w.fts.reset()
	failAll := func(err error) {
		err = translate(ctx, err)
		for _, op := range ops {
			op.done <- err
		}
	}
	tx, err := w.db.BeginTx(ctx, nil)
	if err != nil {
		failAll(fmt.Errorf("begin: %w", err))
		return
	}
	defer tx.Rollback()
	// Savepoints run without a deadline: they touch no page and wait for
	// nothing (the transaction holds the write lock), and the driver runs a
	// goroutine for every statement whose context can end.
	quick := context.Background()
	for i, op := range ops {
		if err := op.ctx.Err(); err != nil {
			errs[i] = err // the client left before its write started: skip it
			continue
		}
		mark := w.fts.mark()
		if _, err := tx.ExecContext(quick, `SAVEPOINT w`); err != nil {
			failAll(err)
			return
		}
		if errs[i] = translate(ctx, w.runOp(ctx, tx, op)); errs[i] != nil {
			if errors.Is(errs[i], ErrUnavailable) {
				failAll(errs[i])
				return
			}
			w.fts.undo(mark)
			if _, err := tx.ExecContext(quick, `ROLLBACK TO w`); err != nil {
				failAll(err)
				return
			}
		}
		if _, err := tx.ExecContext(quick, `RELEASE w`); err != nil {
			failAll(err)
			return
		}
	}
	if err := w.fts.flush(ctx, w, tx); err != nil {
		failAll(fmt.Errorf("full-text index: %w", err))
		return
	}
	if err := tx.Commit(); err != nil {
		failAll(fmt.Errorf("commit: %w", err))
		return
	}
	w.groups.Add(1)
	w.grouped.Add(int64(len(ops)))
	if len(w.fts.journal) > 0 {
		w.ftsGroups.Add(1)
	}
	for i, op := range ops {
		op.done <- errs[i]
	}
}

// runOp runs one write, checking and recording its idempotency key, with a
// panic turned into a *writePanic. The writer runs one group at a time, so
// nothing races between the check and the record.
func (w *writer) runOp(ctx context.Context, tx *sql.Tx, op *writeOp) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &writePanic{value: p, stack: debug.Stack()}
		}
	}()
	q := sqliteTx{w, tx}
	if op.key != nil {
		replay, err := idempotencyRecord(ctx, q, sqliteDialect, op.key, w.clock())
		if err != nil || replay != nil {
			op.replay = replay
			return err
		}
	}
	snapshot, err := op.fn(ctx, q)
	if err != nil || op.key == nil {
		return err
	}
	k := op.key
	// product_id and version are no longer read; they stay for the schema.
	_, err = w.exec(ctx, tx, `INSERT INTO idempotency_keys
		(scope, key, fingerprint, product, product_id, version, created_at) VALUES (?, ?, ?, ?, 0, 0, ?)
		ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint, product = excluded.product,
		created_at = excluded.created_at`,
		k.Scope, k.Key, k.Fingerprint, snapshot, w.clock().UnixMicro())
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

// Stack returns the writer goroutine's stack where the panic happened.
func (e *writePanic) Stack() []byte { return e.stack }

// exec and queryRow run a statement in the writer's transaction, prepared
// once: parsing SQL is a large share of a small write's cost. A statement
// seen for the first time is prepared on the transaction and, once the
// transaction is over, prepared for good (preparing on the pool while the
// transaction holds its one connection would wait for itself).
func (w *writer) exec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	st, err := w.stmt(ctx, tx, query)
	if err != nil {
		return nil, err
	}
	return st.ExecContext(ctx, args...)
}

func (w *writer) stmt(ctx context.Context, tx *sql.Tx, query string) (*sql.Stmt, error) {
	if st, ok := w.wstmts[query]; ok {
		return tx.StmtContext(ctx, st), nil
	}
	w.toPrepare = append(w.toPrepare, query)
	return tx.PrepareContext(ctx, query)
}

// prepareNew prepares the statements first seen in the last transaction.
func (w *writer) prepareNew() {
	for _, q := range w.toPrepare {
		if _, ok := w.wstmts[q]; ok {
			continue
		}
		if st, err := w.db.Prepare(q); err == nil {
			w.wstmts[q] = st
		}
	}
	w.toPrepare = w.toPrepare[:0]
}

// sqliteTx is the writer's transaction as a querier.
type sqliteTx struct {
	w  *writer
	tx *sql.Tx
}

func (t sqliteTx) exec(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := t.w.exec(ctx, t.tx, query, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// insert runs a plain INSERT and reads last_insert_rowid: cheaper than
// RETURNING for a row whose other columns are what was written.
func (t sqliteTx) insert(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := t.w.exec(ctx, t.tx, query, args...)
	if err != nil {
		return 0, err
	}
	return res.LastInsertId()
}

func (t sqliteTx) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	st, err := t.w.stmt(ctx, t.tx, query)
	if err != nil {
		return errRow{err}
	}
	return notFoundRow{st.QueryRowContext(ctx, args...)}
}

func (t sqliteTx) query(ctx context.Context, query string, args ...any) (sqlRows, error) {
	st, err := t.w.stmt(ctx, t.tx, query)
	if err != nil {
		return nil, err
	}
	rows, err := st.QueryContext(ctx, args...)
	if err != nil {
		return nil, err
	}
	return stdRows{rows}, nil
}

func (t sqliteTx) textChanged(id int64, old *Product) { t.w.fts.touch(id, old) }

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

// touch records that the text of product id changes; old is its text as
// committed before (nil: created in this group).
func (b *ftsBatch) touch(id int64, old *Product) {
	if _, ok := b.before[id]; ok {
		return // the first state in the group is the one the index holds
	}
	if old != nil {
		c := *old
		old = &c
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

func (b *ftsBatch) flush(ctx context.Context, w *writer, tx *sql.Tx) error {
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
		if _, err := w.exec(ctx, tx, `INSERT INTO products_fts (products_fts, rowid, name, description)
			SELECT 'delete', value ->> '$.id', value ->> '$.name', value ->> '$.description' FROM json_each(?)`, string(js)); err != nil {
			return err
		}
	}
	ids, _ := json.Marshal(b.journal)
	_, err := w.exec(ctx, tx, `INSERT INTO products_fts (rowid, name, description)
		SELECT id, name, description FROM products WHERE id IN (SELECT value FROM json_each(?))`, string(ids))
	return err
}

// The full-text index (FTS5) writes a new segment at every commit that
// changes it, and segments must be merged as they pile up. FTS5's own
// automerge does that inside the commit that crosses its threshold,
// 64 pages times the number of levels at once: on 200,000 products about
// 500 pages, 40-60 ms of the writer's time for each of several
// consecutive groups every several seconds, during which every write
// waits (and the WAL those pages fill then triggers a checkpoint as well).
// So automerge is off (openSQLite), and ftsMergeLoop merges a few pages at
// a time, each step a transaction of its own between client groups, with
// the same threshold as automerge (usermerge, 4 segments a level). If it
// ever fell behind, FTS5's crisis merge (16 segments a level) still bounds
// the segments. Merging changes how the index is stored, never what it
// holds.
const (
	ftsMergeInterval = 50 * time.Millisecond // how often to look for merge work
	ftsMergePages    = 64                    // pages one step writes at most: a few ms
	ftsMergePause    = 10 * time.Millisecond // between steps that found work
)

// ftsMergeLoop merges the full-text index's segments until the writer
// stops: every interval in which a group changed the index, steps until a
// step finds nothing to merge.
func (w *writer) ftsMergeLoop(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	seen := w.ftsGroups.Load()
	for {
		select {
		case <-w.stop:
			return
		case <-t.C:
		}
		if n := w.ftsGroups.Load(); n == seen {
			continue
		} else {
			seen = n
		}
		for {
			merged, err := w.ftsMergeStep()
			if err != nil || !merged {
				break // an error: the next interval tries again
			}
			select {
			case <-w.stop:
				return
			case <-time.After(ftsMergePause):
			}
		}
	}
}

// ftsMergeStep runs one FTS5 'merge' of at most ftsMergePages pages and
// reports whether it merged anything: the command changes two or more rows
// when it does (see the FTS5 documentation of 'merge').
func (w *writer) ftsMergeStep() (merged bool, err error) {
	err = w.alone(context.Background(), func(ctx context.Context, q querier) error {
		var before, after int64
		if err := q.queryRow(ctx, `SELECT total_changes()`).Scan(&before); err != nil {
			return err
		}
		if _, err := q.exec(ctx, `INSERT INTO products_fts (products_fts, rank) VALUES ('merge', ?)`, ftsMergePages); err != nil {
			return err
		}
		if err := q.queryRow(ctx, `SELECT total_changes()`).Scan(&after); err != nil {
			return err
		}
		merged = after-before >= 2
		return nil
	})
	return merged, err
}
