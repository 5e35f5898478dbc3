// Command refhttp is the "ceiling of net/http" reference for the productsvc
// benchmark: GET /products/{id} answers one fixed product JSON body, with no
// storage behind it. It prints "listening ADDR" as its first stdout line.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

// productBody is a typical product as productsvc encodes it (~300 bytes).
const productBody = `{"id":1,"sku":"SKU-000001","name":"classic steel mug 1","description":"A classic steel mug for everyday use, dishwasher safe and built to last for years.","category":"cat-01","price_cents":1299,"currency":"USD","stock":42,"version":1,"created_at":"2026-11-21T06:00:00.123456Z","updated_at":"2026-11-21T06:00:00.123456Z"}`

func main() {
	if err := run(context.Background(), os.Args, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: newServer(), ReadHeaderTimeout: 5 * time.Second}
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

func newServer() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /ready", handleReady())
	mux.Handle("GET /products/{id}", handleGetProduct([]byte(productBody)))
	return mux
}

func handleReady() http.Handler {
	body := []byte(`{"status":"ok"}`)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
}

// handleGetProduct parses the id like a real handler would, then writes body.
func handleGetProduct(body []byte) http.Handler {
	length := strconv.Itoa(len(body))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if id, err := strconv.ParseInt(r.PathValue("id"), 10, 64); err != nil || id < 1 {
			http.Error(w, "bad id", http.StatusBadRequest)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", length)
		w.Write(body)
	})
}
