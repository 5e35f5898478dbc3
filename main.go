// Command productsvc serves a product catalog over HTTP: products and their
// stock in SQLite, read through an in-process cache and an optional Redis.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	if err := run(context.Background(), os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		var cerr *configError
		if errors.As(err, &cerr) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "dev"
}

// run starts the service and blocks until ctx ends or a signal arrives,
// then shuts down gracefully. A second signal stops it at once.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return nil // the usage went to stdout: asked for, so not an error
	}
	if err != nil {
		return err
	}
	if cfg.Version {
		fmt.Fprintln(stdout, "productsvc", buildVersion())
		return nil
	}
	if cfg.HealthCheck {
		return healthCheck(ctx, cfg.Addr)
	}

	tr, err := newTracing(ctx, getenv, buildVersion())
	if err != nil {
		return &configError{msg: "invalid OTEL_* settings: " + err.Error()}
	}
	defer tr.close(tracingShutdownTimeout)
	logOut := newLogWriter(stdout, 100*time.Millisecond)
	defer logOut.Close()
	var logh slog.Handler = flushHandler{slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: cfg.LogLevel}), logOut}
	if tr.enabled {
		logh = traceLogHandler{logh}
	}
	log := slog.New(logh)
	if tr.enabled {
		routeOTelErrors(log)
	}
	log.Info("starting", append([]any{"version", buildVersion(), "tracing", tr.enabled}, cfg.logAttrs()...)...)
	if len(cfg.APITokens) == 0 && cfg.APITokensFile == "" && cfg.JWTIssuer == "" {
		var b [24]byte
		rand.Read(b[:])
		cfg.APITokens = []string{hex.EncodeToString(b[:])}
		// Logged once so a developer can write; set API_TOKEN in production.
		log.Warn("API_TOKEN is not set; writes need this generated token", "token", cfg.APITokens[0])
	}

	// The tokens file is read before anything is bound or opened: a file
	// that does not parse stops the start, as another invalid setting does.
	tokens := newTokenSet(cfg.APITokens)
	if cfg.APITokensFile != "" {
		if err := tokens.useFile(cfg.APITokensFile); err != nil {
			return &configError{msg: err.Error()}
		}
		log.Info("tokens file loaded", "file", cfg.APITokensFile, "credentials", tokens.len())
	}
	if cfg.JWTIssuer != "" {
		tokens.jwt = newJWTVerifier(cfg.JWTIssuer, cfg.JWTAudience, cfg.JWTJWKSURL, int64(cfg.JWTMaxHeld), log)
		// Not fatal: an issuer that is down now may be up by the first
		// request, which fetches the keys again.
		tokens.jwt.refresh(ctx)
	}

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP re-reads API_TOKENS_FILE (see tokenSet.watch); so does a
	// change to it, looked for every few seconds. Without a file, SIGHUP is
	// taken and ignored rather than ending the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	storeCfg := StoreConfig{DatabaseURL: cfg.DatabaseURL, Path: cfg.DBPath, Sync: cfg.DBSync, Timeout: cfg.DBTimeout,
		KeepUnpublished: cfg.AMQPURL != ""}
	if cfg.CopyTo != "" {
		return copyToPostgres(ctx, storeCfg, cfg.CopyTo, stderr)
	}
	if cfg.Restore != "" {
		return restoreSQLite(ctx, cfg.DBPath, cfg.Restore, cfg.RestoreIfMissing, stdout)
	}
	if cfg.RenewLogID {
		return renewLogID(ctx, storeCfg, stdout)
	}
	// Bind every listener before the store is opened: a port another
	// process holds stops the start before a database file or its lock
	// is created. Nothing is served until the store is open.
	lns, err := listenAll(cfg)
	if err != nil {
		return err
	}
	defer lns.close() // frees the ports if the start fails; after Shutdown, closing again is harmless
	store, err := openStore(ctx, storeCfg)
	if err != nil {
		return fmt.Errorf("open store: %w", err)
	}
	defer func() {
		if err := store.Close(); err != nil {
			log.Error("close store", "err", err.Error())
		}
	}()

	var c cache
	if cfg.RedisURL != "" {
		routeRedisLogs(log)
		rc, err := newRedisCache(cfg.RedisURL, cfg.RedisTimeout, cfg.CacheTTL)
		if err != nil {
			return &configError{msg: "invalid REDIS_URL: " + err.Error()}
		}
		c = rc
		checkRedis(ctx, rc, cfg, log)
	}

	reg := prometheus.NewRegistry()
	m := newMetrics(reg)
	switch st := store.(type) {
	case *sqliteStore:
		m.dbPools(sqlPoolCollector(st.rdb, "sqlite_read"), sqlPoolCollector(st.wdb, "sqlite_write"))
		m.writeGroups(st.GroupStats)
	case *postgresStore:
		m.dbPools(pgPoolCollector{st.Stat})
	}
	var bk *backups // SQLite's; PostgreSQL's backups are its own
	if st, ok := store.(*sqliteStore); ok {
		if bk, err = newBackups(cfg.backupDir(), cfg.BackupKeep, st, log, m); err != nil {
			return err
		}
	}
	localSize := cfg.LocalCacheSize
	if cfg.CacheMemory == 0 {
		localSize = 0 // CACHE_MEMORY=0: no in-process caches
	}
	svc := NewProductService(store, ServiceConfig{
		Cache: c, RedisTimeout: cfg.RedisTimeout, LocalCacheSize: localSize, CacheMemory: cfg.CacheMemory,
		CacheTTL: cfg.CacheTTL, Logger: log, Metrics: m, Tracing: tr,
	})
	defer svc.Close()

	var rl *relay
	if cfg.AMQPURL != "" {
		rm := m.relay()
		rl = newRelay(store.(relayStore), relayConfig{
			Source: cfg.AMQPSource, Dial: dialRelayPublisher(cfg.AMQPURL, cfg.AMQPExchange, rm), BrokerURL: cfg.AMQPURL,
			WarnAge: cfg.RelayWarnAge, Log: log, Metrics: rm, Wake: svc.feed,
		})
	}

	life := &lifecycle{} // started once the store is open and every listener is up
	// Always made: failed authentication is limited even when
	// RATE_LIMIT_RPS is 0 and requests in general are not.
	limiter := newRateLimiter(cfg.RateLimitRPS, cfg.RateLimitBurst, tokens)
	handler := newServer(serverDeps{
		svc: svc, log: log, metrics: m, tokens: tokens, life: life,
		limiter: limiter, proxies: cfg.TrustedProxies, maxFlight: cfg.MaxInFlight, serveMetrics: cfg.MetricsAddr == "", tracing: tr,
		streams: newStreamSlots(cfg.FeedMaxStreams), backups: bk, relay: rl,
	})

	errc := make(chan error, 3)
	servers := []*http.Server{serve(lns.main, handler, log, errc, newConnLimiter(cfg.MaxConns, cfg.MaxConnsPerIP, m, log))}
	log.Info("listening", "addr", lns.main.Addr().String())
	if lns.metrics != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", m.handler())
		servers = append(servers, serve(lns.metrics, mux, log, errc, nil))
		log.Info("metrics listening", "addr", lns.metrics.Addr().String())
	}
	if lns.admin != nil {
		servers = append(servers, serve(lns.admin, adminMux(m), log, errc, nil))
		log.Info("admin listening", "addr", lns.admin.Addr().String())
	}
	life.started.Store(true)

	// The background goroutines are joined before the store closes: the
	// deferred calls run in reverse, so bgCancel, then bg.Wait, then (far
	// above) store.Close.
	var bg sync.WaitGroup
	defer bg.Wait()
	bgCtx, bgCancel := context.WithCancel(ctx)
	defer bgCancel()
	bg.Go(func() { expireIdempotencyKeys(bgCtx, store, log) })
	bg.Go(func() { svc.Probe(bgCtx, time.Second) })
	// The follower serves reads: it stops after the listeners drained, not
	// at the signal as the other background work does.
	followCtx, followCancel := context.WithCancel(context.WithoutCancel(ctx))
	defer followCancel()
	bg.Go(func() { svc.Follow(followCtx) })
	bg.Go(func() { svc.SweepReservations(bgCtx, time.Second) })
	bg.Go(func() { trimChangeFeed(bgCtx, store, log, cfg.EventsRetention, time.Minute) })
	if bk != nil && cfg.BackupInterval > 0 {
		bg.Go(func() { bk.Schedule(bgCtx, cfg.BackupInterval) })
	}
	if rl != nil {
		bg.Go(func() { rl.Run(bgCtx) })
	}
	bg.Go(func() { tokens.watch(bgCtx, hup, tokensFilePoll, log) })

	select {
	case <-ctx.Done():
	case err := <-errc:
		return err
	}
	// From here a second signal ends the process at once. Listen for it
	// before releasing the first handler, so no signal finds neither.
	second := make(chan os.Signal, 1)
	signal.Notify(second, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(second)
	stop()
	done := make(chan error, 1)
	go func() { done <- shutdown(life, servers, cfg, log) }()
	select {
	case err := <-done:
		return err
	case <-second:
		return errors.New("second signal: exiting without draining")
	}
}

// tokensFilePoll is how often run looks for a change to API_TOKENS_FILE.
const tokensFilePoll = 3 * time.Second

// listeners are the bound listeners; metrics and admin are nil when their
// setting is empty.
type listeners struct{ main, metrics, admin net.Listener }

func (l listeners) close() {
	for _, ln := range []net.Listener{l.main, l.metrics, l.admin} {
		if ln != nil {
			ln.Close()
		}
	}
}

// listenAll binds ADDR, METRICS_ADDR and ADMIN_ADDR (those set). On an
// error it closes what it bound and names the setting: "listen on ADDR
// 127.0.0.1:8080: bind: address already in use".
func listenAll(cfg *config) (listeners, error) {
	var lns listeners
	for _, l := range []struct {
		setting, addr string
		dst           *net.Listener
	}{{"ADDR", cfg.Addr, &lns.main}, {"METRICS_ADDR", cfg.MetricsAddr, &lns.metrics}, {"ADMIN_ADDR", cfg.AdminAddr, &lns.admin}} {
		if l.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			lns.close()
			var op *net.OpError
			if errors.As(err, &op) {
				err = op.Err // "bind: address already in use", without the address again
			}
			return listeners{}, fmt.Errorf("listen on %s %s: %w", l.setting, l.addr, err)
		}
		*l.dst = ln
	}
	return lns, nil
}

// serve serves h on ln in the background, its connections bounded by lim
// (nil: unbounded). Serve errors other than a clean shutdown are sent to
// errc.
func serve(ln net.Listener, h http.Handler, log *slog.Logger, errc chan<- error, lim *connLimiter) *http.Server {
	addr := ln.Addr().String()
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,  // slowloris: headers must arrive promptly
		ReadTimeout:       15 * time.Second, // a 1 MiB body at a crawl is cut off
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	if lim != nil {
		ln = lim.wrap(ln, srv)
	}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("serve %s: %w", addr, err)
		}
	}()
	return srv
}

// checkRedis tries Redis once at start, so a wrong or unreachable REDIS_URL
// is in the log before the first request finds it. Redis is optional: the
// service starts either way, and the redis breaker handles it from here.
// The try is bounded by three REDIS_TIMEOUTs: a new connection's dial, the
// INFO it sends, then PING.
func checkRedis(ctx context.Context, rc *redisCache, cfg *config, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(ctx, 3*cfg.RedisTimeout)
	defer cancel()
	err := rc.Ping(ctx)
	if err == nil {
		return
	}
	msg := err.Error()
	if u, perr := url.Parse(cfg.RedisURL); perr == nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			msg = strings.ReplaceAll(msg, pw, "xxxxx") // no Redis error should carry it; never log it
		}
	}
	log.Warn("Redis is not answering at start; serving from the database until it does",
		"redis_url", redactURL(cfg.RedisURL), "err", msg)
}

// adminMux serves pprof and metrics on the loopback-only admin listener.
func adminMux(m *metrics) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("GET /metrics", m.handler())
	return mux
}

// idempotencyExpirer is what expireIdempotencyKeys needs of the store.
type idempotencyExpirer interface {
	// ExpireIdempotencyKeys deletes idempotency records older than
	// idempotencyTTL, in small batches, and returns how many it deleted.
	ExpireIdempotencyKeys(ctx context.Context) (int64, error)
}

// expireIdempotencyKeys deletes expired idempotency keys every few minutes.
func expireIdempotencyKeys(ctx context.Context, store idempotencyExpirer, log *slog.Logger) {
	t := time.NewTicker(10 * time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			n, err := store.ExpireIdempotencyKeys(ctx)
			if err != nil && ctx.Err() == nil {
				log.Warn("expire idempotency keys", "err", err.Error(), "deleted", n)
			} else if n > 0 {
				log.Info("expired idempotency keys", "deleted", n)
			}
		}
	}
}

// healthCheck GETs the service's own /health, for container HEALTHCHECKs on
// images without curl.
func healthCheck(ctx context.Context, addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return &configError{msg: "invalid ADDR: " + err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:"+port+"/health", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: status %d", resp.StatusCode)
	}
	return nil
}
