package main

// The product SQL, written once for both engines (see sqlStore). Every
// write first ends the holding of the product's expired lines
// (releaseDueLines, in inventory.go) in its own transaction, before its
// checks count what is held.

import (
	"context"
	"errors"
	"strings"
	"time"
)

// productColumns is the column list every product query selects, in the
// order scanProduct reads them.
const productColumns = `id, sku, name, description, category, price_cents, currency, stock, reserved, version, created_at, updated_at`

// qualifiedColumns is productColumns for queries that join other tables.
const qualifiedColumns = `products.id, products.sku, products.name, products.description, products.category,
	products.price_cents, products.currency, products.stock, products.reserved, products.version, products.created_at, products.updated_at`

const (
	selectProduct       = `SELECT ` + productColumns + ` FROM products WHERE id = ?`
	selectProductLocked = selectProduct + ` FOR UPDATE`
)

// scanProduct reads a row of productColumns.
func scanProduct(row rowScanner) (Product, error) {
	var p Product
	var created, updated dbTime
	err := row.Scan(&p.ID, &p.SKU, &p.Name, &p.Description, &p.Category, &p.PriceCents,
		&p.Currency, &p.Stock, &p.Reserved, &p.Version, &created, &updated)
	p.CreatedAt, p.UpdatedAt = created.Time, updated.Time
	return p, err
}

// getProduct reads the product with id, locking its row when lock is set
// (in a write, before reading what the write depends on).
func getProduct(ctx context.Context, t tx, id int64, lock bool) (Product, error) {
	q := selectProduct
	if lock && t.forUpdate != "" {
		q = selectProductLocked
	}
	return scanProduct(t.queryRow(ctx, q, id))
}

// listProducts returns one page of products in keyset order.
func listProducts(ctx context.Context, t tx, f ListFilter) (Page, error) {
	query, args := listQuery(t.dialect, f)
	rows, err := t.query(ctx, query, args...)
	if err != nil {
		return Page{}, err
	}
	defer rows.Close()
	items := make([]Product, 0, f.Limit+1)
	for rows.Next() {
		p, err := scanProduct(rows)
		if err != nil {
			return Page{}, err
		}
		items = append(items, p)
	}
	if err := rows.Err(); err != nil {
		return Page{}, err
	}
	var page Page
	if len(items) > f.Limit {
		items = items[:f.Limit]
		page.NextCursor = cursorAfter(f, items[len(items)-1]).encode()
	}
	page.Items = items
	return page, nil
}

// listQuery builds the SQL for f. Every value is a bound parameter; only
// column names from the closed set in sortColumns reach the SQL text.
func listQuery(d *dialect, f ListFilter) (string, []any) {
	var where []string
	var args []any
	add := func(cond string, vs ...any) {
		where = append(where, cond)
		args = append(args, vs...)
	}
	if f.Category != nil {
		add("products.category = ?", *f.Category)
	}
	if f.MinPriceCents != nil {
		add("products.price_cents >= ?", *f.MinPriceCents)
	}
	if f.MaxPriceCents != nil {
		add("products.price_cents <= ?", *f.MaxPriceCents)
	}
	if f.InStock != nil {
		if *f.InStock {
			add("products.stock > products.reserved") // available > 0
		} else {
			add("products.stock <= products.reserved")
		}
	}
	col := sortColumns[f.Sort]
	from, idCol := "products", "products.id"
	if len(f.Terms) > 0 {
		var cond string
		var arg any
		from, cond, arg, idCol = d.fullText(f.Terms, col == "id")
		add(cond, arg)
	}
	cmp, dir := ">", "ASC"
	if f.Desc {
		cmp, dir = "<", "DESC"
	}
	if f.After != nil {
		if col == "id" {
			add(idCol+" "+cmp+" ?", f.After.ID)
		} else {
			key := f.After.Key
			if col == "created_at" {
				key = d.ts(time.UnixMicro(f.After.Key.(int64)).UTC())
			}
			add("(products."+col+", products.id) "+cmp+" (?, ?)", key, f.After.ID)
		}
	}
	var b strings.Builder
	b.WriteString("SELECT " + qualifiedColumns + " FROM " + from)
	if len(where) > 0 {
		b.WriteString(" WHERE " + strings.Join(where, " AND "))
	}
	if col == "id" {
		b.WriteString(" ORDER BY " + idCol + " " + dir)
	} else {
		b.WriteString(" ORDER BY products." + col + " " + dir + ", products.id " + dir)
	}
	b.WriteString(" LIMIT ?")
	args = append(args, f.Limit+1)
	return b.String(), args
}

// createProduct inserts p and returns it with its id, version 1 and
// timestamps.
func createProduct(ctx context.Context, t tx, now time.Time, actor string, p Product) (Product, error) {
	p.Version, p.Reserved, p.CreatedAt, p.UpdatedAt = 1, 0, now, now
	args := append([]any{p.SKU, p.Name, p.Description, p.Category, p.PriceCents, p.Currency, p.Stock,
		t.ts(now), t.ts(now)}, t.searchArgs(&p)...)
	id, err := t.insert(ctx, t.insertProduct, args...)
	if err != nil {
		return Product{}, err // a taken sku: ErrConflict
	}
	p.ID = id
	t.textChanged(id, nil)
	return p, appendEvent(ctx, t, now, actor, EventProductCreated, &p, nil)
}

// updateProduct applies u to the product with id, holding its row, and
// stores the result at the next version. It returns the product as it is
// after the call, and false when the patch changed nothing (nothing is
// written).
func updateProduct(ctx context.Context, t tx, now time.Time, actor string, id int64, u ProductUpdate) (Product, bool, error) {
	cur, err := getProduct(ctx, t, id, true)
	if err != nil {
		return Product{}, false, err
	}
	if err := u.IfMatch.check(cur.Version); err != nil {
		return Product{}, false, err
	}
	next := cur
	if !u.Patch.apply(&next) {
		return cur, false, nil
	}
	due, err := dueUnits(ctx, t, now, id)
	if err != nil {
		return Product{}, false, err
	}
	if next.Stock < cur.Reserved-due {
		return Product{}, false, ErrInsufficientStock // stock below what open holds keep
	}
	if due > 0 {
		if err := releaseDueLines(ctx, t, now, id); err != nil {
			return Product{}, false, err
		}
	}
	args := append([]any{next.SKU, next.Name, next.Description, next.Category, next.PriceCents, next.Currency, next.Stock,
		due, t.ts(now)}, t.searchArgs(&next)...)
	out, err := scanProduct(t.queryRow(ctx, t.updateProduct, append(args, id)...))
	if err != nil {
		return Product{}, false, err // a taken sku: ErrConflict
	}
	if cur.Name != out.Name || cur.Description != out.Description {
		t.textChanged(id, &cur)
	}
	return out, true, appendEvent(ctx, t, now, actor, updateEvent(cur, next), &out, nil)
}

// adjustStock adds delta to the stock of the product with id in one
// statement, holding its row, after checking cond against its version. It
// returns ErrInsufficientStock if the stock would go below what open holds
// keep or above the maximum.
func adjustStock(ctx context.Context, t tx, now time.Time, actor string, id, delta int64, cond *IfMatch) (Product, error) {
	var version int64
	if err := t.queryRow(ctx, `SELECT version FROM products WHERE id = ?`+t.forUpdate, id).Scan(&version); err != nil {
		return Product{}, err
	}
	if err := cond.check(version); err != nil {
		return Product{}, err
	}
	due, err := dueUnits(ctx, t, now, id)
	if err != nil {
		return Product{}, err
	}
	if due > 0 {
		if err := releaseDueLines(ctx, t, now, id); err != nil {
			return Product{}, err
		}
	}
	p, err := scanProduct(t.queryRow(ctx, `UPDATE products SET
		stock = stock + ?, reserved = reserved - ?, version = version + 1, updated_at = ?
		WHERE id = ? AND stock + ? BETWEEN reserved - ? AND 1000000000000
		RETURNING `+productColumns, delta, due, t.ts(now), id, delta, due))
	if errors.Is(err, ErrNotFound) {
		return Product{}, ErrInsufficientStock // the row is there: it was read above
	}
	if err != nil {
		return Product{}, err
	}
	return p, appendEvent(ctx, t, now, actor, EventStockChanged, &p, nil)
}

// deleteProduct removes the product with id, holding its row, after
// checking cond against its version, and returns it as it was. It returns
// ErrReserved while open holds name it.
func deleteProduct(ctx context.Context, t tx, now time.Time, actor string, id int64, cond *IfMatch) (Product, error) {
	cur, err := getProduct(ctx, t, id, true)
	if err != nil {
		return Product{}, err
	}
	if err := cond.check(cur.Version); err != nil {
		return Product{}, err
	}
	due, err := dueUnits(ctx, t, now, id)
	if err != nil {
		return Product{}, err
	}
	if cur.Reserved-due > 0 {
		return Product{}, ErrReserved
	}
	if due > 0 {
		if err := releaseDueLines(ctx, t, now, id); err != nil {
			return Product{}, err
		}
	}
	if _, err := t.exec(ctx, `DELETE FROM products WHERE id = ?`, id); err != nil {
		return Product{}, err
	}
	t.textChanged(id, &cur)
	return cur, appendEvent(ctx, t, now, actor, EventProductDeleted, &cur, nil)
}

// updateEvent is the event type of a product update from cur to next: a
// change of stock alone is stock.changed.
func updateEvent(cur, next Product) string {
	cur.Stock = next.Stock
	if cur == next {
		return EventStockChanged
	}
	return EventProductUpdated
}
