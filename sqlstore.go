package main

// The store written once. sqlStore implements the productStore methods whose
// SQL is the same on both engines — every product, inventory and feed
// statement — over two small values an engine supplies: a dialect (what
// differs in the text of a statement) and an engine (how statements run:
// SQLite's one group-commit writer, PostgreSQL's pool of concurrent
// transactions). The engine files keep only what truly differs.
//
// A write crosses the boundary as data — a product, a patch, a delta, a
// precondition — and the SQL below applies the domain's pure rules
// (ProductPatch.apply, IfMatch.check) inside the write's transaction. The
// functions run there are the store's own: an engine may run one again
// (PostgreSQL retries a transaction that lost a serialization check).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// querier runs statements written with ? placeholders on a transaction or,
// for reads, a pool. A row that is not there scans as ErrNotFound.
type querier interface {
	exec(ctx context.Context, query string, args ...any) (int64, error) // rows affected
	queryRow(ctx context.Context, query string, args ...any) rowScanner
	query(ctx context.Context, query string, args ...any) (sqlRows, error)
	// insert runs an INSERT of one row and returns the row's id.
	insert(ctx context.Context, query string, args ...any) (int64, error)
	// textChanged tells the engine that the indexed text of product id
	// changes in this transaction: old is its committed text, nil for a
	// product created here. SQLite's writer keeps its full-text index by
	// it; PostgreSQL writes the index with the row and ignores it.
	textChanged(id int64, old *Product)
}

// rowScanner is one row of a result.
type rowScanner interface{ Scan(dest ...any) error }

// sqlRows is a result set of several rows.
type sqlRows interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
	Close()
}

// engine is how an engine runs the statements written once.
type engine interface {
	// reader returns the pool reads run on.
	reader() querier
	// write runs fn as one client write, in a transaction (or, in SQLite,
	// a savepoint of a group's transaction) of its own, and returns once
	// it committed durably or failed having changed nothing. With key, a
	// live record under key is replayed instead of running fn: write
	// returns the record's snapshot, or ErrIdempotencyMismatch when the
	// request differs; else fn's snapshot is recorded under key in fn's
	// transaction, so the write and its record commit together.
	write(ctx context.Context, key *IdempotencyKey, fn func(ctx context.Context, q querier) (snapshot []byte, err error)) (replay []byte, err error)
	// alone runs fn in a transaction of its own, never grouped with client
	// writes: maintenance never shares their fate.
	alone(ctx context.Context, fn func(ctx context.Context, q querier) error) error
	// translate turns the engine's driver errors into domain errors; ctx
	// is the context the failed call ran under.
	translate(ctx context.Context, err error) error
}

// dialect is what differs between the engines in the text of a statement.
type dialect struct {
	// forUpdate locks the rows a SELECT reads, where the engine has row
	// locks; SQLite's one writer runs one write at a time and needs none.
	forUpdate string
	// ts is a time as the engine stores it: Unix microseconds in SQLite,
	// timestamptz in PostgreSQL.
	ts func(time.Time) any
	// searchColumn is set where the full-text vector is a column of
	// products written with the row (PostgreSQL), from searchText.
	searchColumn bool
	// fullText returns how a listing matches terms: the FROM clause, the
	// condition, its one argument, and the column that orders by id
	// (byID: the listing is in id order).
	fullText func(terms []string, byID bool) (from, cond string, arg any, idColumn string)

	// lockHolder, given a holder's name, serialises that holder's
	// reservations until the transaction ends, so a hold cap is counted
	// and kept atomically; "" where one write runs at a time (SQLite).
	lockHolder string

	// Statements that depend on the fields above, built once.
	insertProduct, updateProduct string
}

// newDialect completes d with the statements built from its fields.
func newDialect(d dialect) *dialect {
	cols, vals, set := "", "", ""
	if d.searchColumn {
		cols, vals, set = ", search", ", to_tsvector('simple', ?)", ", search = to_tsvector('simple', ?)"
	}
	d.insertProduct = `INSERT INTO products
		(sku, name, description, category, price_cents, currency, stock, version, created_at, updated_at` + cols + `)
		VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?` + vals + `)`
	d.updateProduct = `UPDATE products SET
		sku = ?, name = ?, description = ?, category = ?, price_cents = ?, currency = ?, stock = ?,
		reserved = reserved - ?, version = version + 1, updated_at = ?` + set + `
		WHERE id = ? RETURNING ` + productColumns
	return &d
}

// searchArgs are the arguments a product's full-text column takes, if the
// dialect has one.
func (d *dialect) searchArgs(p *Product) []any {
	if !d.searchColumn {
		return nil
	}
	return []any{searchText(p.Name, p.Description)}
}

// tx is a querier with its engine's dialect: what the SQL written once runs on.
type tx struct {
	querier
	*dialect
}

// sqlStore is the product store written once over an engine and a dialect.
// The engine types embed it and add what is theirs.
type sqlStore struct {
	eng     engine
	d       *dialect
	timeout time.Duration    // bound on every read and on each write
	now     func() time.Time // the store's clock
	// counted is told of each committed create (+1) and delete (-1):
	// SQLite keeps its product count by it. Nil where the engine counts
	// otherwise.
	counted func(delta int64)
	// keepUnpublished keeps events the relay has not published from
	// retention (the relay is on).
	keepUnpublished bool
}

// nowMicro is the store's clock at the microsecond both engines keep.
func (s *sqlStore) nowMicro() time.Time { return s.now().UTC().Truncate(time.Microsecond) }

func (s *sqlStore) read() tx { return tx{s.eng.reader(), s.d} }

// runRead runs fn on the read pool, bounded by the store's timeout, and
// translates its error.
func runRead[T any](ctx context.Context, s *sqlStore, fn func(ctx context.Context, t tx) (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	v, err := fn(ctx, s.read())
	return v, s.eng.translate(ctx, err)
}

// runWrite runs fn as one client write (see engine.write) and returns what
// it made, or, for a replay of key, what the first request made and true.
func runWrite[T any](ctx context.Context, s *sqlStore, key *IdempotencyKey, fn func(ctx context.Context, t tx) (T, error)) (T, bool, error) {
	var out T
	replay, err := s.eng.write(ctx, key, func(ctx context.Context, q querier) ([]byte, error) {
		var err error
		if out, err = fn(ctx, tx{q, s.d}); err != nil || key == nil {
			return nil, err
		}
		return json.Marshal(out)
	})
	if err != nil {
		var zero T
		return zero, false, err
	}
	if replay == nil {
		return out, false, nil
	}
	var first T
	if err := json.Unmarshal(replay, &first); err != nil {
		return first, false, fmt.Errorf("idempotency record: %w", err)
	}
	return first, true, nil
}

// Ping checks that a read connection can run a query.
func (s *sqlStore) Ping(ctx context.Context) error {
	_, err := runRead(ctx, s, func(ctx context.Context, t tx) (int, error) {
		var one int
		return one, t.queryRow(ctx, `SELECT 1`).Scan(&one)
	})
	return err
}

// Get returns the product with id, or ErrNotFound.
func (s *sqlStore) Get(ctx context.Context, id int64) (Product, error) {
	p, err := runRead(ctx, s, func(ctx context.Context, t tx) (Product, error) { return getProduct(ctx, t, id, false) })
	if err != nil {
		return Product{}, fmt.Errorf("get product %d: %w", id, err)
	}
	return p, nil
}

// List returns one page of products in keyset order.
func (s *sqlStore) List(ctx context.Context, f ListFilter) (Page, error) {
	page, err := runRead(ctx, s, func(ctx context.Context, t tx) (Page, error) { return listProducts(ctx, t, f) })
	if err != nil {
		return Page{}, fmt.Errorf("list products: %w", err)
	}
	return page, nil
}

// Create inserts p and returns it with its id, version 1 and timestamps,
// and whether it is the replay of an earlier request with key. It returns
// ErrConflict if the SKU is taken, or ErrIdempotencyMismatch.
func (s *sqlStore) Create(ctx context.Context, actor string, p Product, key *IdempotencyKey) (Product, bool, error) {
	out, replayed, err := runWrite(ctx, s, key, func(ctx context.Context, t tx) (Product, error) {
		return createProduct(ctx, t, s.nowMicro(), actor, p)
	})
	if err != nil {
		return Product{}, false, fmt.Errorf("create product: %w", err)
	}
	if !replayed && s.counted != nil {
		s.counted(1)
	}
	return out, replayed, nil
}

// Update applies u to the product with id and stores the result at the
// next version. It returns the product as it is after the call and whether
// the call changed it (a patch that changes nothing writes nothing). It
// returns ErrNotFound, ErrPrecondition, ErrConflict (SKU taken) or
// ErrInsufficientStock (stock below what open holds keep).
func (s *sqlStore) Update(ctx context.Context, actor string, id int64, u ProductUpdate) (Product, bool, error) {
	type result struct {
		P       Product
		Changed bool
	}
	r, _, err := runWrite(ctx, s, nil, func(ctx context.Context, t tx) (result, error) {
		p, changed, err := updateProduct(ctx, t, s.nowMicro(), actor, id, u)
		return result{p, changed}, err
	})
	if err != nil {
		return Product{}, false, fmt.Errorf("update product %d: %w", id, err)
	}
	return r.P, r.Changed, nil
}

// AdjustStock adds delta to the stock of the product with id in one atomic
// step, after checking cond against its version, and reports whether the
// result is the replay of an earlier request with key. It returns
// ErrNotFound, ErrPrecondition, ErrIdempotencyMismatch, or
// ErrInsufficientStock, changing nothing, if stock would go below what open
// holds keep or above its maximum.
func (s *sqlStore) AdjustStock(ctx context.Context, actor string, id, delta int64, cond *IfMatch, key *IdempotencyKey) (Product, bool, error) {
	p, replayed, err := runWrite(ctx, s, key, func(ctx context.Context, t tx) (Product, error) {
		return adjustStock(ctx, t, s.nowMicro(), actor, id, delta, cond)
	})
	if err != nil {
		return Product{}, false, fmt.Errorf("adjust stock of product %d: %w", id, err)
	}
	return p, replayed, nil
}

// Delete removes the product with id, after checking cond against its
// version, and returns it as it was. It returns ErrNotFound,
// ErrPrecondition, or ErrReserved while open holds name it.
func (s *sqlStore) Delete(ctx context.Context, actor string, id int64, cond *IfMatch) (Product, error) {
	gone, _, err := runWrite(ctx, s, nil, func(ctx context.Context, t tx) (Product, error) {
		return deleteProduct(ctx, t, s.nowMicro(), actor, id, cond)
	})
	if err != nil {
		return Product{}, fmt.Errorf("delete product %d: %w", id, err)
	}
	if s.counted != nil {
		s.counted(-1)
	}
	return gone, nil
}

// Reserve holds r.Lines for ttl, all or nothing, within maxHeld (0: no
// cap); see reserve. A replay of key returns the reservation the first
// request made, and no products.
func (s *sqlStore) Reserve(ctx context.Context, r Reservation, ttl time.Duration, maxHeld int64, key *IdempotencyKey) (Reserved, error) {
	var changed []Product
	held, replayed, err := runWrite(ctx, s, key, func(ctx context.Context, t tx) (Reservation, error) {
		held, ps, err := reserve(ctx, t, s.nowMicro(), r, ttl, maxHeld)
		changed = ps
		return held, err
	})
	if err != nil {
		return Reserved{}, fmt.Errorf("reserve: %w", err)
	}
	if replayed {
		changed = nil
	}
	return Reserved{Reservation: held, Changed: changed, Replayed: replayed}, nil
}

// Transition moves reservation id to state to; see transition.
func (s *sqlStore) Transition(ctx context.Context, actor, id, to string) (Reserved, error) {
	out, _, err := runWrite(ctx, s, nil, func(ctx context.Context, t tx) (Reserved, error) {
		r, changed, err := transition(ctx, t, s.nowMicro(), actor, id, to)
		return Reserved{Reservation: r, Changed: changed}, err
	})
	if err != nil {
		return Reserved{}, fmt.Errorf("reservation %s: %w", id, err)
	}
	return out, nil
}

// Reservation returns reservation id, or ErrReservationNotFound.
func (s *sqlStore) Reservation(ctx context.Context, id string) (Reservation, error) {
	return runRead(ctx, s, func(ctx context.Context, t tx) (Reservation, error) { return loadReservation(ctx, t, id, false) })
}

// ReservationsByReference returns the newest reservations under ref, at
// most limit, newest first.
func (s *sqlStore) ReservationsByReference(ctx context.Context, ref string, limit int) ([]Reservation, error) {
	return runRead(ctx, s, func(ctx context.Context, t tx) ([]Reservation, error) {
		return reservationsByReference(ctx, t, ref, limit)
	})
}

// NextHoldExpiry returns when the earliest open hold expires, or the zero
// time when none is open.
func (s *sqlStore) NextHoldExpiry(ctx context.Context) (time.Time, error) {
	return runRead(ctx, s, nextHoldExpiry)
}

// ExpireReservations records up to limit held reservations whose time ran
// out as expired, each in a transaction of its own, and returns how many
// it recorded and the products that changed.
func (s *sqlStore) ExpireReservations(ctx context.Context, limit int) (int, []Product, error) {
	ids, err := runRead(ctx, s, func(ctx context.Context, t tx) ([]string, error) {
		return dueReservations(ctx, t, s.nowMicro(), limit)
	})
	if err != nil {
		return 0, nil, fmt.Errorf("expire reservations: %w", err)
	}
	n := 0
	var changed []Product
	for _, id := range ids {
		var expired bool
		var ps []Product
		err := s.eng.alone(ctx, func(ctx context.Context, q querier) error {
			var err error
			expired, ps, err = expireOne(ctx, tx{q, s.d}, s.nowMicro(), id)
			return err
		})
		if err != nil {
			return n, changed, fmt.Errorf("expire reservation %s: %w", id, err)
		}
		if expired {
			n++
		}
		changed = append(changed, ps...)
	}
	return n, changed, nil
}

// Events returns up to limit events after seq after, in seq order, or a
// *FeedGoneError when retention trimmed some of them.
func (s *sqlStore) Events(ctx context.Context, after int64, limit int) ([]Event, error) {
	es, err := runRead(ctx, s, func(ctx context.Context, t tx) ([]Event, error) { return readEvents(ctx, t, after, limit) })
	if err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	return es, nil
}

// LogID returns the change log's identity: made with the database, renewed
// by a restore.
func (s *sqlStore) LogID(ctx context.Context) (string, error) {
	id, err := runRead(ctx, s, feedLogID)
	if err != nil {
		return "", fmt.Errorf("change log id: %w", err)
	}
	return id, nil
}

// FeedHead returns the change feed's head: the highest seq given, or the
// trimmed-through mark when retention deleted every event.
func (s *sqlStore) FeedHead(ctx context.Context) (int64, error) {
	head, err := runRead(ctx, s, feedHead)
	if err != nil {
		return 0, fmt.Errorf("feed head: %w", err)
	}
	return head, nil
}

// TrimEvents deletes events older than before in batches of expireBatch,
// each in a transaction of its own, and returns how many it deleted.
func (s *sqlStore) TrimEvents(ctx context.Context, before time.Time) (int64, error) {
	var total int64
	for {
		var n int64
		err := s.eng.alone(ctx, func(ctx context.Context, q querier) error {
			var err error
			n, err = trimEvents(ctx, tx{q, s.d}, before, expireBatch, s.keepUnpublished)
			return err
		})
		total += n
		if err != nil {
			return total, fmt.Errorf("trim events: %w", err)
		}
		if n < expireBatch {
			return total, nil
		}
	}
}

// RelayPosition returns the relay's position, and the change log's
// identity and start (the seq its oldest kept event follows), read together.
func (s *sqlStore) RelayPosition(ctx context.Context) (pos RelayPosition, logID string, start int64, err error) {
	type result struct {
		pos   RelayPosition
		logID string
		start int64
	}
	r, err := runRead(ctx, s, func(ctx context.Context, t tx) (result, error) {
		var r result
		var err error
		if r.pos, err = relayPosition(ctx, t); err != nil {
			return r, err
		}
		if r.logID, err = feedLogID(ctx, t); err != nil {
			return r, err
		}
		r.start, err = feedStart(ctx, t)
		return r, err
	})
	if err != nil {
		return RelayPosition{}, "", 0, fmt.Errorf("relay position: %w", err)
	}
	return r.pos, r.logID, r.start, nil
}

// ProbeWrite makes one small real write, to learn whether writes work again
// after a failure (a full or read-only disk, a lost connection).
func (s *sqlStore) ProbeWrite(ctx context.Context) error {
	_, err := s.eng.write(ctx, nil, func(ctx context.Context, q querier) ([]byte, error) {
		_, err := q.exec(ctx, `INSERT INTO write_probe (id, at) VALUES (1, ?)
			ON CONFLICT (id) DO UPDATE SET at = excluded.at`, s.d.ts(s.nowMicro()))
		return nil, err
	})
	return err
}

// ExpireIdempotencyKeys deletes records older than idempotencyTTL, in
// batches of expireBatch, each in a transaction of its own between client
// writes: a backlog of any size neither fails nor stalls them. It returns
// how many it deleted, and stops early when ctx ends.
func (s *sqlStore) ExpireIdempotencyKeys(ctx context.Context) (int64, error) {
	cutoff := s.d.ts(s.now().Add(-idempotencyTTL))
	var total int64
	for {
		var n int64
		err := s.eng.alone(ctx, func(ctx context.Context, q querier) error {
			var err error
			n, err = q.exec(ctx, `DELETE FROM idempotency_keys WHERE (scope, key) IN
				(SELECT scope, key FROM idempotency_keys WHERE created_at <= ? ORDER BY created_at LIMIT ?)`, cutoff, expireBatch)
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

// idempotencyRecord reads the live record under k for a write about to run
// under it: nil when there is none (or it expired), its snapshot when it
// was made by the same request, else ErrIdempotencyMismatch.
func idempotencyRecord(ctx context.Context, q querier, d *dialect, k *IdempotencyKey, now time.Time) ([]byte, error) {
	var fp string
	var snapshot []byte
	err := q.queryRow(ctx, `SELECT fingerprint, product FROM idempotency_keys
		WHERE scope = ? AND key = ? AND created_at > ?`, k.Scope, k.Key, d.ts(now.Add(-idempotencyTTL))).Scan(&fp, &snapshot)
	switch {
	case errors.Is(err, ErrNotFound):
		return nil, nil
	case err != nil:
		return nil, err
	case fp != k.Fingerprint:
		return nil, ErrIdempotencyMismatch
	case snapshot == nil:
		return nil, errors.New("idempotency record without its snapshot")
	}
	return snapshot, nil
}
