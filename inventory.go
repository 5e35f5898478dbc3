package main

// Reservations and the change feed, written once for both engines (see
// sqlStore): each engine runs this code in its own write transaction, over
// a tx that hides what differs: placeholders, how a time is stored, row
// locks.
//
// Locks, where the engine has them (PostgreSQL), are always taken in the
// same order: a reservation's row before its products', and products in id
// order. So no two writes wait for each other in a cycle.
//
// A hold stops counting the moment it expires, before any sweeper records
// it: every write that needs a product's units first ends the holding of
// that product's expired lines (releaseDueLines), in the same transaction
// as the write itself. The sweeper (ExpireReservations) later records the
// reservation as expired and ends the lines still holding elsewhere.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"
)

// dbTime scans a time stored as Unix microseconds (SQLite) or as a
// timestamptz (PostgreSQL).
type dbTime struct{ time.Time }

func (t *dbTime) Scan(src any) error {
	switch v := src.(type) {
	case int64:
		t.Time = time.UnixMicro(v).UTC()
	case time.Time:
		t.Time = v.UTC()
	case nil:
		t.Time = time.Time{} // NULL
	default:
		return fmt.Errorf("scan a time from %T", src)
	}
	return nil
}

// newReservationID returns an opaque, unguessable reservation id.
func newReservationID() string {
	var b [16]byte
	rand.Read(b[:])
	return "res_" + hex.EncodeToString(b[:])
}

// appendEvent records a committed write in the change feed, in the write's
// own transaction. A product event carries the product as it became; a
// delete carries none, at the version one above the deleted product (the
// tombstone's). actor is who made the write ("" for the service's own:
// NULL).
func appendEvent(ctx context.Context, t tx, now time.Time, actor, typ string, p *Product, r *Reservation) error {
	var productID, version, reservationID, state, data any
	switch {
	case r != nil:
		reservationID, state = r.ID, r.State
		data, _ = json.Marshal(r) // a Reservation always encodes
	case typ == EventProductDeleted:
		productID, version = p.ID, p.Version+1
	default:
		productID, version = p.ID, p.Version
		data, _ = json.Marshal(p)
	}
	_, err := t.exec(ctx, `INSERT INTO events (type, occurred_at, product_id, version, reservation_id, state, data, actor)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)`, typ, t.ts(now), productID, version, reservationID, state, data, nullable(actor))
	return err
}

// nullable stores "" as NULL: the columns that say who did something are
// NULL when nobody did (the service itself).
func nullable(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// releaseDueLines ends the holding of the lines on product id whose hold
// expired by now: the units dueUnits counted. The caller, which holds the
// product's row (or the one writer), subtracts them from reserved in its
// own update of the product, and calls this only when there are some.
func releaseDueLines(ctx context.Context, t tx, now time.Time, id int64) error {
	_, err := t.exec(ctx, `UPDATE reservation_lines SET holding = 0
		WHERE product_id = ? AND holding = 1 AND expires_at <= ?`, id, t.ts(now))
	return err
}

// reserve holds r.Lines for ttl, all or nothing, for r.CreatedBy (also
// the actor of its events). With maxHeld above 0 it returns a
// *HoldCapError, before writing anything, if r.CreatedBy would then hold
// more than maxHeld units in open reservations: the count and the hold are
// one transaction, and the holder's reservations are serialised (lockHolder)
// so two holds at once cannot both pass under the cap. It returns a
// *ValidationError naming lines whose product does not exist, or a
// *ShortageError naming every short line, before writing anything; else
// the held reservation and the products it changed.
func reserve(ctx context.Context, t tx, now time.Time, r Reservation, ttl time.Duration, maxHeld int64) (Reservation, []Product, error) {
	if maxHeld > 0 {
		if err := checkHoldCap(ctx, t, now, r, maxHeld); err != nil {
			return Reservation{}, nil, err
		}
	}
	order := make([]int, len(r.Lines)) // line indexes in product id order, for the locks
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return cmpInt64(r.Lines[a].ProductID, r.Lines[b].ProductID) })

	current := make([]Product, len(r.Lines))
	problems := map[string]string{}
	for _, i := range order {
		p, err := getProduct(ctx, t, r.Lines[i].ProductID, true)
		if errors.Is(err, ErrNotFound) {
			problems[fmt.Sprintf("lines[%d].product_id", i)] = "no product has this id"
			continue
		}
		if err != nil {
			return Reservation{}, nil, err
		}
		current[i] = p
	}
	if len(problems) > 0 {
		return Reservation{}, nil, &ValidationError{Problems: problems}
	}
	due := make([]int64, len(r.Lines))
	var short []Shortage
	for _, i := range order {
		var err error
		if due[i], err = dueUnits(ctx, t, now, current[i].ID); err != nil {
			return Reservation{}, nil, err
		}
		available := current[i].Stock - (current[i].Reserved - due[i])
		if r.Lines[i].Quantity > available {
			short = append(short, Shortage{Line: i, ProductID: current[i].ID, Requested: r.Lines[i].Quantity, Available: max(available, 0)})
		}
	}
	if len(short) > 0 {
		slices.SortFunc(short, func(a, b Shortage) int { return a.Line - b.Line })
		return Reservation{}, nil, &ShortageError{Lines: short}
	}

	r.State, r.CreatedAt, r.UpdatedAt, r.ExpiresAt = StateHeld, now, now, now.Add(ttl)
	if _, err := t.exec(ctx, `INSERT INTO reservations (id, reference, state, created_at, expires_at, updated_at, created_by)
		VALUES (?, ?, ?, ?, ?, ?, ?)`, r.ID, r.Reference, r.State, t.ts(now), t.ts(r.ExpiresAt), t.ts(now), nullable(r.CreatedBy)); err != nil {
		return Reservation{}, nil, err
	}
	changed := make([]Product, 0, len(r.Lines))
	for _, i := range order {
		l := r.Lines[i]
		if due[i] > 0 {
			if err := releaseDueLines(ctx, t, now, l.ProductID); err != nil {
				return Reservation{}, nil, err
			}
		}
		if _, err := t.exec(ctx, `INSERT INTO reservation_lines (reservation_id, line, product_id, quantity, holding, expires_at)
			VALUES (?, ?, ?, ?, 1, ?)`, r.ID, i, l.ProductID, l.Quantity, t.ts(r.ExpiresAt)); err != nil {
			return Reservation{}, nil, err
		}
		p, err := scanProduct(t.queryRow(ctx, `UPDATE products SET reserved = reserved - ? + ?, version = version + 1, updated_at = ?
			WHERE id = ? RETURNING `+productColumns, due[i], l.Quantity, t.ts(now), l.ProductID))
		if err != nil {
			return Reservation{}, nil, err
		}
		if err := appendEvent(ctx, t, now, r.CreatedBy, EventStockChanged, &p, nil); err != nil {
			return Reservation{}, nil, err
		}
		changed = append(changed, p)
	}
	if err := appendEvent(ctx, t, now, r.CreatedBy, EventReservationHeld, nil, &r); err != nil {
		return Reservation{}, nil, err
	}
	return r, changed, nil
}

// checkHoldCap returns a *HoldCapError if r.CreatedBy, holding r's units
// too, would hold more than maxHeld units in open reservations. A hold
// whose time ran out no longer counts, as it no longer counts against
// stock. It takes the holder's lock first (before any product row), so it
// runs before the statements whose snapshot it must see.
func checkHoldCap(ctx context.Context, t tx, now time.Time, r Reservation, maxHeld int64) error {
	if t.lockHolder != "" {
		if _, err := t.exec(ctx, t.lockHolder, r.CreatedBy); err != nil {
			return err
		}
	}
	var held int64
	if err := t.queryRow(ctx, `SELECT coalesce(sum(l.quantity), 0) FROM reservations r
		JOIN reservation_lines l ON l.reservation_id = r.id
		WHERE r.created_by = ? AND r.state = 'held' AND l.holding = 1 AND l.expires_at > ?`,
		r.CreatedBy, t.ts(now)).Scan(&held); err != nil {
		return err
	}
	var want int64
	for _, l := range r.Lines {
		want += l.Quantity
	}
	if held+want > maxHeld {
		return &HoldCapError{Cap: maxHeld, Held: held, Requested: want}
	}
	return nil
}

// dueUnits returns the units that expired holds still count against
// product id.
func dueUnits(ctx context.Context, t tx, now time.Time, id int64) (int64, error) {
	var due int64
	err := t.queryRow(ctx, `SELECT coalesce(sum(quantity), 0) FROM reservation_lines
		WHERE product_id = ? AND holding = 1 AND expires_at <= ?`, id, t.ts(now)).Scan(&due)
	return due, err
}

// loadReservation reads reservation id, locking its row when lock is set.
// It returns ErrReservationNotFound.
func loadReservation(ctx context.Context, t tx, id string, lock bool) (Reservation, error) {
	r := Reservation{ID: id}
	var created, expires, updated dbTime
	var by *string
	q := `SELECT reference, state, created_at, expires_at, updated_at, created_by FROM reservations WHERE id = ?`
	if lock {
		q += t.forUpdate
	}
	if err := t.queryRow(ctx, q, id).Scan(&r.Reference, &r.State, &created, &expires, &updated, &by); err != nil {
		if errors.Is(err, ErrNotFound) {
			return Reservation{}, ErrReservationNotFound
		}
		return Reservation{}, err
	}
	r.CreatedAt, r.ExpiresAt, r.UpdatedAt = created.Time, expires.Time, updated.Time
	if by != nil {
		r.CreatedBy = *by
	}
	rows, err := t.query(ctx, `SELECT product_id, quantity FROM reservation_lines WHERE reservation_id = ? ORDER BY line`, id)
	if err != nil {
		return Reservation{}, err
	}
	defer rows.Close()
	for rows.Next() {
		var l ReservationLine
		if err := rows.Scan(&l.ProductID, &l.Quantity); err != nil {
			return Reservation{}, err
		}
		r.Lines = append(r.Lines, l)
	}
	return r, rows.Err()
}

// reservationsByReference returns the newest reservations made under ref,
// at most limit of them, newest first.
func reservationsByReference(ctx context.Context, t tx, ref string, limit int) ([]Reservation, error) {
	rows, err := t.query(ctx, `SELECT id FROM reservations WHERE reference = ? ORDER BY created_at DESC, id LIMIT ?`, ref, limit)
	if err != nil {
		return nil, err
	}
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, err
		}
		ids = append(ids, id)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	out := make([]Reservation, 0, len(ids))
	for _, id := range ids {
		r, err := loadReservation(ctx, t, id, false)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// transition moves reservation id to state to (confirmed or released). The
// same transition again changes nothing and returns the reservation as it
// is. A hold whose time ran out is recorded as expired instead, and
// returned in that state with the products that changed: the caller
// answers it as ErrReservationExpired. The other transition after one is
// ErrInvalidState.
func transition(ctx context.Context, t tx, now time.Time, actor, id, to string) (Reservation, []Product, error) {
	r, err := loadReservation(ctx, t, id, true)
	if err != nil {
		return Reservation{}, nil, err
	}
	switch {
	case r.State == to || r.State == StateExpired:
		return r, nil, nil
	case r.State != StateHeld:
		return r, nil, ErrInvalidState
	case !now.Before(r.ExpiresAt):
		to = StateExpired
	}
	if to == StateExpired {
		actor = "" // the hold ran out; this call only records it
	}
	changed, err := finish(ctx, t, now, actor, &r, to)
	return r, changed, err
}

// finish ends held reservation r in state to: confirmed takes its units out
// of stock; released and expired give them back. Lines that a write already
// released (their hold had expired) are skipped. It returns the products
// that changed. actor is who ended it ("" when it expired).
func finish(ctx context.Context, t tx, now time.Time, actor string, r *Reservation, to string) ([]Product, error) {
	// The lines' products are locked first, in id order, as every write
	// that touches a product locks it before it releases the product's due
	// lines (releaseDueLines). Read before the locks, a line could be
	// released by such a write between the read and the products' update,
	// and both would give its units back: reserved would drift below the
	// units held, and a later release would break its constraint.
	// (PostgreSQL; SQLite runs one write at a time.)
	if t.forUpdate != "" {
		if err := lockLineProducts(ctx, t, r.ID); err != nil {
			return nil, err
		}
	}
	rows, err := t.query(ctx, `SELECT product_id, quantity FROM reservation_lines
		WHERE reservation_id = ? AND holding = 1 ORDER BY product_id`, r.ID)
	if err != nil {
		return nil, err
	}
	var holding []ReservationLine
	for rows.Next() {
		var l ReservationLine
		if err := rows.Scan(&l.ProductID, &l.Quantity); err != nil {
			rows.Close()
			return nil, err
		}
		holding = append(holding, l)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	changed := make([]Product, 0, len(holding))
	for _, l := range holding {
		taken := int64(0) // units leaving stock
		if to == StateConfirmed {
			taken = l.Quantity
		}
		p, err := scanProduct(t.queryRow(ctx, `UPDATE products SET stock = stock - ?, reserved = reserved - ?,
			version = version + 1, updated_at = ? WHERE id = ? RETURNING `+productColumns,
			taken, l.Quantity, t.ts(now), l.ProductID))
		if err != nil {
			return nil, err
		}
		if err := appendEvent(ctx, t, now, actor, EventStockChanged, &p, nil); err != nil {
			return nil, err
		}
		changed = append(changed, p)
	}
	if _, err := t.exec(ctx, `UPDATE reservation_lines SET holding = 0 WHERE reservation_id = ? AND holding = 1`, r.ID); err != nil {
		return nil, err
	}
	if _, err := t.exec(ctx, `UPDATE reservations SET state = ?, updated_at = ? WHERE id = ?`, to, t.ts(now), r.ID); err != nil {
		return nil, err
	}
	r.State, r.UpdatedAt = to, now
	typ := map[string]string{StateConfirmed: EventReservationConfirmed, StateReleased: EventReservationReleased, StateExpired: EventReservationExpired}[to]
	if err := appendEvent(ctx, t, now, actor, typ, nil, r); err != nil {
		return nil, err
	}
	return changed, nil
}

// lockLineProducts locks, in id order, the products of reservation id's
// lines that still hold units.
func lockLineProducts(ctx context.Context, t tx, id string) error {
	rows, err := t.query(ctx, `SELECT DISTINCT product_id FROM reservation_lines
		WHERE reservation_id = ? AND holding = 1 ORDER BY product_id`, id)
	if err != nil {
		return err
	}
	var ids []int64
	for rows.Next() {
		var pid int64
		if err := rows.Scan(&pid); err != nil {
			rows.Close()
			return err
		}
		ids = append(ids, pid)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	for _, pid := range ids {
		if _, err := getProduct(ctx, t, pid, true); err != nil {
			return err
		}
	}
	return nil
}

// dueReservations returns up to limit held reservations whose time ran out.
func dueReservations(ctx context.Context, t tx, now time.Time, limit int) ([]string, error) {
	rows, err := t.query(ctx, `SELECT id FROM reservations WHERE state = 'held' AND expires_at <= ?
		ORDER BY expires_at LIMIT ?`, t.ts(now), limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// expireOne records reservation id as expired if it still is held and due,
// and reports whether it did.
func expireOne(ctx context.Context, t tx, now time.Time, id string) (bool, []Product, error) {
	r, err := loadReservation(ctx, t, id, true)
	if err != nil || r.State != StateHeld || now.Before(r.ExpiresAt) {
		return false, nil, err // another write finished it first
	}
	changed, err := finish(ctx, t, now, "", &r, StateExpired)
	return err == nil, changed, err
}

// readEvents returns up to limit events after seq after, in seq order. It
// returns a *FeedGoneError if retention trimmed events after after.
func readEvents(ctx context.Context, t tx, after int64, limit int) ([]Event, error) {
	var trimmed int64
	if err := t.queryRow(ctx, `SELECT trimmed_through FROM feed_state WHERE id = 1`).Scan(&trimmed); err != nil {
		return nil, err
	}
	if after < trimmed {
		return nil, &FeedGoneError{Oldest: trimmed + 1}
	}
	rows, err := t.query(ctx, `SELECT `+eventColumns+` FROM events
		WHERE seq > ? ORDER BY seq LIMIT ?`, after, limit)
	if err != nil {
		return nil, err
	}
	return scanEvents(rows)
}

// eventColumns are the columns scanEvents reads; an event without a seq
// yet (PostgreSQL, between commit and sequencing) reads as seq 0.
const eventColumns = `coalesce(seq, 0), type, occurred_at, product_id, version, data, actor`

// scanEvents reads rows of eventColumns and closes them.
func scanEvents(rows sqlRows) ([]Event, error) {
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var at dbTime
		var productID, version *int64
		var data []byte
		var actor *string
		if err := rows.Scan(&e.Seq, &e.Type, &at, &productID, &version, &data, &actor); err != nil {
			return nil, err
		}
		if actor != nil {
			e.Actor = *actor
		}
		e.OccurredAt = at.Time
		if productID != nil {
			e.ProductID, e.Version = *productID, *version
		}
		var err error
		switch {
		case len(data) == 0:
		case productID != nil:
			e.Product = new(Product)
			err = json.Unmarshal(data, e.Product)
			e.Product.CreatedAt, e.Product.UpdatedAt = e.Product.CreatedAt.UTC(), e.Product.UpdatedAt.UTC()
		default:
			e.Reservation = new(Reservation)
			err = json.Unmarshal(data, e.Reservation)
			r := e.Reservation
			r.CreatedAt, r.ExpiresAt, r.UpdatedAt = r.CreatedAt.UTC(), r.ExpiresAt.UTC(), r.UpdatedAt.UTC()
		}
		if err != nil {
			return nil, fmt.Errorf("event %d: %w", e.Seq, err)
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

// trimEvents deletes up to limit events older than before and moves the
// trimmed-through mark past them. It returns how many it deleted. With
// keepUnpublished it deletes only events the relay has published: at or
// below its position in this log (none while its position is another
// log's).
func trimEvents(ctx context.Context, t tx, before time.Time, limit int, keepUnpublished bool) (int64, error) {
	through := int64(math.MaxInt64)
	if keepUnpublished {
		err := t.queryRow(ctx, `SELECT CASE WHEN r.log_id = f.log_id THEN r.position ELSE 0 END
			FROM relay_state r, feed_state f WHERE r.id = 1 AND f.id = 1`).Scan(&through)
		if err != nil {
			return 0, err
		}
	}
	var top *int64
	if err := t.queryRow(ctx, `SELECT max(seq) FROM (SELECT seq FROM events
		WHERE seq IS NOT NULL AND occurred_at < ? AND seq <= ? ORDER BY seq LIMIT ?) AS t`, t.ts(before), through, limit).Scan(&top); err != nil {
		return 0, err
	}
	if top == nil {
		return 0, nil
	}
	n, err := t.exec(ctx, `DELETE FROM events WHERE seq <= ?`, *top)
	if err != nil {
		return 0, err
	}
	_, err = t.exec(ctx, `UPDATE feed_state SET trimmed_through = ? WHERE id = 1 AND trimmed_through < ?`, *top, *top)
	return n, err
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// nextHoldExpiry returns when the earliest held reservation expires, or the
// zero time when none is held.
func nextHoldExpiry(ctx context.Context, t tx) (time.Time, error) {
	var at dbTime // NULL (none held) scans as the zero time
	err := t.queryRow(ctx, `SELECT min(expires_at) FROM reservations WHERE state = 'held'`).Scan(&at)
	return at.Time, err
}

// feedLogID returns the change log's identity.
func feedLogID(ctx context.Context, t tx) (string, error) {
	var id string
	err := t.queryRow(ctx, `SELECT log_id FROM feed_state WHERE id = 1`).Scan(&id)
	return id, err
}

// feedHead returns the change feed's head: the highest seq given, or the
// trimmed-through mark when retention deleted every event.
func feedHead(ctx context.Context, t tx) (int64, error) {
	var head int64
	err := t.queryRow(ctx, `SELECT CASE WHEN h.m > h.t THEN h.m ELSE h.t END FROM
		(SELECT coalesce((SELECT max(seq) FROM events), 0) AS m, trimmed_through AS t FROM feed_state WHERE id = 1) AS h`).Scan(&head)
	return head, err
}

// RelayPosition is where the relay is in a change log: the broker has
// confirmed every event of log LogID up to seq Seq. An empty LogID is no
// log yet.
type RelayPosition struct {
	LogID string
	Seq   int64
}

// errRelayMoved is a relay position that is no longer where the relay
// that read it left it: another relay moved it.
var errRelayMoved = errors.New("relay position moved by another relay")

// relayPosition reads the relay's position.
func relayPosition(ctx context.Context, t tx) (RelayPosition, error) {
	var p RelayPosition
	err := t.queryRow(ctx, `SELECT log_id, position FROM relay_state WHERE id = 1`).Scan(&p.LogID, &p.Seq)
	return p, err
}

// moveRelay sets the relay's position to to if it is still from, else
// returns errRelayMoved: a stale relay can neither move it back nor skip.
func moveRelay(ctx context.Context, t tx, from, to RelayPosition) error {
	n, err := t.exec(ctx, `UPDATE relay_state SET log_id = ?, position = ?
		WHERE id = 1 AND log_id = ? AND position = ?`, to.LogID, to.Seq, from.LogID, from.Seq)
	if err == nil && n != 1 {
		err = errRelayMoved
	}
	return err
}

// feedStart returns the seq the feed's oldest kept event follows: the
// trimmed-through mark.
func feedStart(ctx context.Context, t tx) (int64, error) {
	var trimmed int64
	err := t.queryRow(ctx, `SELECT trimmed_through FROM feed_state WHERE id = 1`).Scan(&trimmed)
	return trimmed, err
}
