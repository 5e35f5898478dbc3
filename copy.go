package main

// -copy-to: moving an existing SQLite catalog to PostgreSQL.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// copyBatch is how many rows each copy transaction carries.
const copyBatch = 1000

// copyToPostgres copies the SQLite catalog at cfg.Path into the PostgreSQL
// database at dstURL (migrating it first), keeping ids, versions,
// timestamps and idempotency records, and reports progress to progress.
//
// It is safe to re-run: a product already there is overwritten only by a
// higher version of itself, so a product changed through PostgreSQL since
// an earlier copy keeps its change; records already there stay. It never
// deletes. The id sequence is moved past the highest id, so ids are never
// reused. Stop the service first: the SQLite file is read under its
// exclusive lock, so the copy is of one consistent catalog.
func copyToPostgres(ctx context.Context, cfg StoreConfig, dstURL string, progress io.Writer) error {
	if _, err := os.Stat(cfg.Path); err != nil {
		return fmt.Errorf("copy: no SQLite catalog at DB_PATH %q: %w", cfg.Path, err)
	}
	src, err := openSQLite(ctx, cfg)
	if err != nil {
		return fmt.Errorf("copy: open %s: %w", cfg.Path, err)
	}
	defer src.Close()
	dst, err := openPostgres(ctx, StoreConfig{DatabaseURL: dstURL, Timeout: 30 * time.Second})
	if err != nil {
		return fmt.Errorf("copy: open %s: %w", redactURL(dstURL), err)
	}
	defer dst.Close()

	total := src.Count()
	fmt.Fprintf(progress, "copying %d products from %s to %s\n", total, cfg.Path, redactURL(dstURL))
	var copied, written int64
	last := time.Now()
	for after := int64(0); ; {
		ps, err := src.productsAfter(ctx, after, copyBatch)
		if err != nil {
			return fmt.Errorf("copy: read products: %w", err)
		}
		if len(ps) == 0 {
			break
		}
		n, err := dst.upsertProducts(ctx, ps)
		if err != nil {
			return fmt.Errorf("copy: products after id %d: %w", after, err)
		}
		after = ps[len(ps)-1].ID
		copied += int64(len(ps))
		written += n
		if time.Since(last) >= time.Second {
			fmt.Fprintf(progress, "copied %d of %d products\n", copied, total)
			last = time.Now()
		}
	}
	if err := dst.advanceIDs(ctx); err != nil {
		return fmt.Errorf("copy: id sequence: %w", err)
	}
	var records int64
	for after := (idemKeyPos{}); ; {
		rs, err := src.idempotencyAfter(ctx, after, copyBatch)
		if err != nil {
			return fmt.Errorf("copy: read idempotency records: %w", err)
		}
		if len(rs) == 0 {
			break
		}
		if err := dst.insertIdempotency(ctx, rs); err != nil {
			return fmt.Errorf("copy: idempotency records: %w", err)
		}
		after = rs[len(rs)-1].idemKeyPos
		records += int64(len(rs))
	}
	var rows [3]int64
	for i, t := range copiedTables {
		if rows[i], err = copyTable(ctx, src, dst, t); err != nil {
			return fmt.Errorf("copy: %s: %w", t.name, err)
		}
	}
	if _, err := dst.pool.Exec(ctx, `SELECT setval(pg_get_serial_sequence('events', 'id'), greatest(
			(SELECT coalesce(max(id), 0) FROM events), nextval(pg_get_serial_sequence('events', 'id')) - 1, 1))`); err != nil {
		return fmt.Errorf("copy: event id sequence: %w", err)
	}
	var trimmed int64
	if err := src.rdb.QueryRowContext(ctx, `SELECT trimmed_through FROM feed_state WHERE id = 1`).Scan(&trimmed); err != nil {
		return fmt.Errorf("copy: feed state: %w", translate(ctx, err))
	}
	if _, err := dst.pool.Exec(ctx, `UPDATE feed_state SET trimmed_through = greatest(trimmed_through, $1) WHERE id = 1`, trimmed); err != nil {
		return fmt.Errorf("copy: feed state: %w", err)
	}
	fmt.Fprintf(progress, "copied %d products (%d written, %d already up to date), %d idempotency records, %d reservations (%d lines) and %d events\n",
		copied, written, copied-written, records, rows[0], rows[1], rows[2])
	return nil
}

// copiedTable is a table -copy-to moves row by row, in key order: the
// SQLite query reads a page after a key, the PostgreSQL statement writes
// one row and leaves a row already there as it is, unless newer (update).
type copiedTable struct {
	name   string
	read   string // SELECT … WHERE key > ? ORDER BY key LIMIT ?, key columns first
	keys   int    // how many leading columns are the key
	write  string // INSERT … ON CONFLICT …, one $n a column
	micros []int  // columns SQLite stores as Unix microseconds
}

var copiedTables = []copiedTable{
	{name: "reservations", keys: 1, micros: []int{3, 4, 5},
		read: `SELECT id, reference, state, created_at, expires_at, updated_at, created_by FROM reservations WHERE id > ? ORDER BY id LIMIT ?`,
		write: `INSERT INTO reservations (id, reference, state, created_at, expires_at, updated_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)
			ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at
			WHERE reservations.updated_at < excluded.updated_at`},
	{name: "reservation lines", keys: 2, micros: []int{5},
		read: `SELECT reservation_id, line, product_id, quantity, holding, expires_at FROM reservation_lines
			WHERE (reservation_id, line) > (?, ?) ORDER BY reservation_id, line LIMIT ?`,
		write: `INSERT INTO reservation_lines (reservation_id, line, product_id, quantity, holding, expires_at)
			VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (reservation_id, line) DO UPDATE SET holding = least(reservation_lines.holding, excluded.holding)`},
	// Events keep their seq (and take it as their id), so a consumer's
	// position means the same after the move; PostgreSQL's sequencer goes on
	// from the highest.
	{name: "events", keys: 1, micros: []int{2},
		read: `SELECT seq, type, occurred_at, product_id, version, reservation_id, state, data, actor FROM events WHERE seq > ? ORDER BY seq LIMIT ?`,
		write: `INSERT INTO events (id, seq, type, occurred_at, product_id, version, reservation_id, state, data, actor)
			VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING`},
}

// copyTable copies t from src to dst in pages of copyBatch rows, each page
// one transaction, and returns how many rows it read.
func copyTable(ctx context.Context, src *sqliteStore, dst *postgresStore, t copiedTable) (int64, error) {
	after := make([]any, t.keys)
	for i := range after {
		after[i] = "" // sorts before every id; a line number or seq is never below 0
		if i > 0 || t.name == "events" {
			after[i] = int64(-1)
		}
	}
	var total int64
	for {
		rows, err := src.rdb.QueryContext(ctx, t.read, append(slices.Clone(after), copyBatch)...)
		if err != nil {
			return total, translate(ctx, err)
		}
		var page [][]any
		for rows.Next() {
			cols, _ := rows.Columns()
			vals := make([]any, len(cols))
			ptrs := make([]any, len(cols))
			for i := range vals {
				ptrs[i] = &vals[i]
			}
			if err := rows.Scan(ptrs...); err != nil {
				rows.Close()
				return total, err
			}
			for _, i := range t.micros {
				vals[i] = time.UnixMicro(vals[i].(int64)).UTC()
			}
			page = append(page, vals)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return total, err
		}
		if len(page) == 0 {
			return total, nil
		}
		err = pgx.BeginFunc(ctx, dst.pool, func(tx pgx.Tx) error {
			b := &pgx.Batch{}
			for _, vals := range page {
				b.Queue(t.write, vals...)
			}
			return tx.SendBatch(ctx, b).Close()
		})
		if err != nil {
			return total, err
		}
		total += int64(len(page))
		after = page[len(page)-1][:t.keys]
	}
}

// productsAfter returns up to n products with ids above after, in id order.
func (s *sqliteStore) productsAfter(ctx context.Context, after int64, n int) ([]Product, error) {
	rows, err := s.rdb.QueryContext(ctx, `SELECT `+productColumns+` FROM products WHERE id > ? ORDER BY id LIMIT ?`, after, n)
	if err != nil {
		return nil, translate(ctx, err)
	}
	defer rows.Close()
	var ps []Product
	for rows.Next() {
		p, err := scanProduct(rows)
		if err != nil {
			return nil, translate(ctx, err)
		}
		ps = append(ps, p)
	}
	return ps, translate(ctx, rows.Err())
}

// idemKeyPos is an idempotency record's primary key.
type idemKeyPos struct{ scope, key string }

// idemRow is an idempotency record as stored.
type idemRow struct {
	idemKeyPos
	fingerprint string
	product     []byte
	createdAt   time.Time
}

// idempotencyAfter returns up to n live idempotency records after pos, in
// key order.
func (s *sqliteStore) idempotencyAfter(ctx context.Context, pos idemKeyPos, n int) ([]idemRow, error) {
	cutoff := s.now().Add(-idempotencyTTL).UnixMicro()
	rows, err := s.rdb.QueryContext(ctx, `SELECT scope, key, fingerprint, product, created_at FROM idempotency_keys
		WHERE (scope, key) > (?, ?) AND created_at > ? ORDER BY scope, key LIMIT ?`, pos.scope, pos.key, cutoff, n)
	if err != nil {
		return nil, translate(ctx, err)
	}
	defer rows.Close()
	var rs []idemRow
	for rows.Next() {
		var r idemRow
		var created int64
		if err := rows.Scan(&r.scope, &r.key, &r.fingerprint, &r.product, &created); err != nil {
			return nil, translate(ctx, err)
		}
		r.createdAt = time.UnixMicro(created).UTC()
		rs = append(rs, r)
	}
	return rs, translate(ctx, rows.Err())
}

// upsertProducts writes ps with their ids, versions and timestamps in one
// transaction. A product already stored at the same or a higher version is
// left as it is. It returns how many rows it wrote.
func (s *postgresStore) upsertProducts(ctx context.Context, ps []Product) (int64, error) {
	var written int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		b := &pgx.Batch{}
		for _, p := range ps {
			b.Queue(`INSERT INTO products
				(id, sku, name, description, category, price_cents, currency, stock, reserved, version, created_at, updated_at, search)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $13, $9, $10, $11, to_tsvector('simple', $12))
				ON CONFLICT (id) DO UPDATE SET sku = excluded.sku, name = excluded.name, description = excluded.description,
					category = excluded.category, price_cents = excluded.price_cents, currency = excluded.currency,
					stock = excluded.stock, reserved = excluded.reserved, version = excluded.version, created_at = excluded.created_at,
					updated_at = excluded.updated_at, search = excluded.search
				WHERE products.version < excluded.version`,
				p.ID, p.SKU, p.Name, p.Description, p.Category, p.PriceCents, p.Currency, p.Stock, p.Version,
				p.CreatedAt, p.UpdatedAt, searchText(p.Name, p.Description), p.Reserved)
		}
		br := tx.SendBatch(ctx, b)
		for i := range ps {
			tag, err := br.Exec()
			if err != nil {
				br.Close()
				if e := pgTranslate(ctx, err); errors.Is(e, ErrConflict) {
					return fmt.Errorf("product %d: sku %q belongs to another product in the target database: %w", ps[i].ID, ps[i].SKU, e)
				}
				return fmt.Errorf("product %d: %w", ps[i].ID, err)
			}
			written += tag.RowsAffected()
		}
		return br.Close()
	})
	return written, err
}

// advanceIDs moves the id sequence past every stored id, never back.
func (s *postgresStore) advanceIDs(ctx context.Context) error {
	_, err := s.pool.Exec(ctx, `SELECT setval(seq, greatest(top, nextval(seq) - 1, 1))
		FROM (SELECT pg_get_serial_sequence('products', 'id') AS seq, (SELECT coalesce(max(id), 0) FROM products) AS top) AS t`)
	return err
}

// insertIdempotency stores rs; a record already there is kept.
func (s *postgresStore) insertIdempotency(ctx context.Context, rs []idemRow) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		b := &pgx.Batch{}
		for _, r := range rs {
			b.Queue(`INSERT INTO idempotency_keys (scope, key, fingerprint, product, created_at) VALUES ($1, $2, $3, $4, $5)
				ON CONFLICT (scope, key) DO NOTHING`, r.scope, r.key, r.fingerprint, r.product, r.createdAt)
		}
		return tx.SendBatch(ctx, b).Close()
	})
}
