// Command refsqlite is the "ceiling of HTTP + SQLite" reference for the
// productsvc benchmark. It serves GET /products/{id} with a prepared point
// query over a small pool of WAL read connections, and POST /products with one
// writer connection (synchronous=FULL, one row per transaction). It seeds
// -seed products in one transaction at start and prints "listening ADDR" as
// its first stdout line once it serves.
package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "modernc.org/sqlite"
)

const schema = `
CREATE TABLE IF NOT EXISTS products (
	id          INTEGER PRIMARY KEY,
	sku         TEXT NOT NULL UNIQUE,
	name        TEXT NOT NULL,
	description TEXT NOT NULL DEFAULT '',
	category    TEXT NOT NULL DEFAULT '',
	price_cents INTEGER NOT NULL,
	currency    TEXT NOT NULL DEFAULT 'USD',
	stock       INTEGER NOT NULL DEFAULT 0,
	version     INTEGER NOT NULL DEFAULT 1,
	created_at  TEXT NOT NULL,
	updated_at  TEXT NOT NULL
)`

const (
	insertSQL = `INSERT INTO products (sku, name, description, category, price_cents, currency, stock, version, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?) RETURNING id`
	getSQL = `SELECT id, sku, name, description, category, price_cents, currency, stock, version, created_at, updated_at
		FROM products WHERE id = ?`
	timeLayout = "2006-01-02T15:04:05.000000Z"
)

// product mirrors productsvc's JSON field order.
type product struct {
	ID          int64  `json:"id"`
	SKU         string `json:"sku"`
	Name        string `json:"name"`
	Description string `json:"description"`
	Category    string `json:"category"`
	PriceCents  int64  `json:"price_cents"`
	Currency    string `json:"currency"`
	Stock       int64  `json:"stock"`
	Version     int64  `json:"version"`
	CreatedAt   string `json:"created_at"`
	UpdatedAt   string `json:"updated_at"`
}

func main() {
	if err := run(context.Background(), os.Args, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	dbPath := fs.String("db", "", "SQLite file (default: a new file in a temporary directory, removed at exit)")
	seed := fs.Int("seed", 10000, "products to insert at start, in one transaction")
	readers := fs.Int("readers", 4, "read connections")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *dbPath == "" {
		dir, err := os.MkdirTemp("", "refsqlite-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		*dbPath = filepath.Join(dir, "ref.db")
	}
	st, err := openStore(ctx, *dbPath, *readers)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.seed(ctx, *seed); err != nil {
		return err
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: newServer(st), ReadHeaderTimeout: 5 * time.Second}
	fmt.Fprintf(stdout, "listening %s\n", ln.Addr())

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// store holds separate read and write pools: WAL lets readers run beside the
// single writer, and one writer connection means no SQLITE_BUSY between writers.
type store struct {
	read, write *sql.DB
	get, insert *sql.Stmt
}

func openStore(ctx context.Context, path string, readers int) (*store, error) {
	dsn := func(pragmas ...string) string {
		q := url.Values{}
		for _, p := range pragmas {
			q.Add("_pragma", p)
		}
		return "file:" + path + "?" + q.Encode()
	}
	write, err := sql.Open("sqlite", dsn("busy_timeout(5000)", "journal_mode(WAL)", "synchronous(FULL)"))
	if err != nil {
		return nil, err
	}
	write.SetMaxOpenConns(1)
	if _, err := write.ExecContext(ctx, schema); err != nil {
		write.Close()
		return nil, fmt.Errorf("migrate: %w", err)
	}
	read, err := sql.Open("sqlite", dsn("busy_timeout(5000)", "query_only(1)"))
	if err != nil {
		write.Close()
		return nil, err
	}
	read.SetMaxOpenConns(readers)
	read.SetMaxIdleConns(readers)
	read.SetConnMaxIdleTime(0)
	st := &store{read: read, write: write}
	if st.get, err = read.PrepareContext(ctx, getSQL); err != nil {
		st.Close()
		return nil, fmt.Errorf("prepare get: %w", err)
	}
	if st.insert, err = write.PrepareContext(ctx, insertSQL); err != nil {
		st.Close()
		return nil, fmt.Errorf("prepare insert: %w", err)
	}
	return st, nil
}

func (s *store) Close() error {
	return errors.Join(s.read.Close(), s.write.Close())
}

// seed inserts n products shaped like the benchmark's own seed data.
func (s *store) seed(ctx context.Context, n int) error {
	words := []string{"classic", "steel", "wooden", "organic", "portable", "wireless", "compact", "premium"}
	nouns := []string{"mug", "lamp", "chair", "desk", "bottle", "backpack", "notebook", "speaker"}
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	stmt := tx.StmtContext(ctx, s.insert)
	now := time.Now().UTC().Format(timeLayout)
	for i := 1; i <= n; i++ {
		w, noun := words[i%len(words)], nouns[(i/len(words))%len(nouns)]
		name := fmt.Sprintf("%s %s %d", w, noun, i)
		desc := fmt.Sprintf("A %s %s for everyday use, built to last.", w, noun)
		var id int64
		err := stmt.QueryRowContext(ctx, fmt.Sprintf("SEED-%06d", i), name, desc,
			fmt.Sprintf("cat-%02d", i%20), 100+rand.Int64N(100000), "USD", rand.Int64N(1000), now, now).Scan(&id)
		if err != nil {
			return fmt.Errorf("seed: %w", err)
		}
	}
	return tx.Commit()
}

func newServer(st *store) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /ready", handleReady())
	mux.Handle("GET /products/{id}", handleGetProduct(st))
	mux.Handle("POST /products", handleCreateProduct(st))
	return mux
}

func handleReady() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

func handleGetProduct(st *store) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
		if err != nil || id < 1 {
			http.Error(w, "bad id", http.StatusBadRequest)
			return
		}
		var p product
		err = st.get.QueryRowContext(r.Context(), id).Scan(&p.ID, &p.SKU, &p.Name, &p.Description,
			&p.Category, &p.PriceCents, &p.Currency, &p.Stock, &p.Version, &p.CreatedAt, &p.UpdatedAt)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			http.Error(w, "not found", http.StatusNotFound)
		case err != nil:
			http.Error(w, "internal error", http.StatusInternalServerError)
		default:
			writeJSON(w, http.StatusOK, p)
		}
	})
}

func handleCreateProduct(st *store) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var p product
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			http.Error(w, "bad json", http.StatusBadRequest)
			return
		}
		if p.SKU == "" || p.Name == "" || p.PriceCents < 0 {
			http.Error(w, "invalid product", http.StatusUnprocessableEntity)
			return
		}
		if p.Currency == "" {
			p.Currency = "USD"
		}
		p.Version = 1
		p.CreatedAt = time.Now().UTC().Format(timeLayout)
		p.UpdatedAt = p.CreatedAt
		// Autocommit: each INSERT is its own transaction, fsynced (synchronous=FULL).
		err := st.insert.QueryRowContext(r.Context(), p.SKU, p.Name, p.Description, p.Category,
			p.PriceCents, p.Currency, p.Stock, p.CreatedAt, p.UpdatedAt).Scan(&p.ID)
		switch {
		case err != nil && strings.Contains(err.Error(), "UNIQUE"):
			http.Error(w, "duplicate sku", http.StatusConflict)
		case err != nil:
			http.Error(w, "internal error", http.StatusInternalServerError)
		default:
			w.Header().Set("Location", "/products/"+strconv.FormatInt(p.ID, 10))
			writeJSON(w, http.StatusCreated, p)
		}
	})
}

// writeJSON encodes v into a buffer before writing any header.
func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(v); err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}
