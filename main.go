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
	log, tr, closeLog, err := newLogger(ctx, cfg, getenv, stdout)
	if err != nil {
		return err
	}
	defer closeLog()
	tokens, err := newCredentials(ctx, cfg, log)
	if err != nil {
		return err
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
	switch {
	case cfg.CopyTo != "":
		return copyToPostgres(ctx, storeCfg, cfg.CopyTo, stderr)
	case cfg.Restore != "":
		return restoreSQLite(ctx, cfg.DBPath, cfg.Restore, cfg.RestoreIfMissing, stdout)
	case cfg.RenewLogID:
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

	a, err := assemble(ctx, cfg, store, tokens, log, tr)
	if err != nil {
		return err
	}
	defer a.svc.Close()
	errc := make(chan error, 3)
	servers := a.serve(lns, cfg, errc)
	a.life.started.Store(true)
	// Joined before the store closes: deferred calls run in reverse.
	defer a.startBackground(ctx, cfg, hup)()

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
	go func() { done <- shutdown(a.life, servers, cfg, a.log) }()
	select {
	case err := <-done:
		return err
	case <-second:
		return errors.New("second signal: exiting without draining")
	}
}

// newLogger returns the process's JSON logger (trace-aware when
// OTEL_EXPORTER_OTLP_ENDPOINT is set), the tracing, and what closes both.
func newLogger(ctx context.Context, cfg *config, getenv func(string) string, stdout io.Writer) (*slog.Logger, *tracing, func(), error) {
	tr, err := newTracing(ctx, getenv, buildVersion())
	if err != nil {
		return nil, nil, nil, &configError{msg: "invalid OTEL_* settings: " + err.Error()}
	}
	logOut := newLogWriter(stdout, 100*time.Millisecond)
	var logh slog.Handler = flushHandler{slog.NewJSONHandler(logOut, &slog.HandlerOptions{Level: cfg.LogLevel}), logOut}
	if tr.enabled {
		logh = traceLogHandler{logh}
	}
	log := slog.New(logh)
	if tr.enabled {
		routeOTelErrors(log)
	}
	log.Info("starting", append([]any{"version", buildVersion(), "tracing", tr.enabled}, cfg.logAttrs()...)...)
	return log, tr, func() { logOut.Close(); tr.close(tracingShutdownTimeout) }, nil
}

// newCredentials returns the credentials cfg names: API_TOKEN,
// API_TOKENS_FILE and OIDC access tokens. With none set, it makes a token
// and logs it once, so a developer can write. The tokens file is read
// before anything is bound or opened: a file that does not parse stops the
// start, as another invalid setting does.
func newCredentials(ctx context.Context, cfg *config, log *slog.Logger) (*tokenSet, error) {
	if len(cfg.APITokens) == 0 && cfg.APITokensFile == "" && cfg.JWTIssuer == "" {
		var b [24]byte
		rand.Read(b[:])
		cfg.APITokens = []string{hex.EncodeToString(b[:])}
		log.Warn("API_TOKEN is not set; writes need this generated token", "token", cfg.APITokens[0])
	}
	tokens := newTokenSet(cfg.APITokens)
	if cfg.APITokensFile != "" {
		if err := tokens.useFile(cfg.APITokensFile); err != nil {
			return nil, &configError{msg: err.Error()}
		}
		log.Info("tokens file loaded", "file", cfg.APITokensFile, "credentials", tokens.len())
	}
	if cfg.JWTIssuer != "" {
		tokens.jwt = newJWTVerifier(cfg.JWTIssuer, cfg.JWTAudience, cfg.JWTJWKSURL, int64(cfg.JWTMaxHeld), log)
		// Not fatal: an issuer that is down now may be up by the first
		// request, which fetches the keys again.
		tokens.jwt.refresh(ctx)
	}
	return tokens, nil
}

// app is the service wired over an open store: what run serves and runs
// in the background.
type app struct {
	store   productStore
	svc     *ProductService
	metrics *metrics
	tokens  *tokenSet
	backups *backups // nil: the engine's backups are its own (PostgreSQL)
	relay   *relay   // nil: AMQP_URL unset
	life    *lifecycle
	handler http.Handler
	log     *slog.Logger
}

// assemble wires the caches, metrics, service, backups, relay and handler
// over store.
func assemble(ctx context.Context, cfg *config, store productStore, tokens *tokenSet, log *slog.Logger, tr *tracing) (*app, error) {
	var c cache
	if cfg.RedisURL != "" {
		routeRedisLogs(log)
		rc, err := newRedisCache(cfg.RedisURL, cfg.RedisTimeout, cfg.CacheTTL)
		if err != nil {
			return nil, &configError{msg: "invalid REDIS_URL: " + err.Error()}
		}
		c = rc
		checkRedis(ctx, rc, cfg, log)
	}
	a := &app{store: store, tokens: tokens, log: log, metrics: newMetrics(prometheus.NewRegistry()),
		life: &lifecycle{}} // started once the store is open and every listener is up
	m := a.metrics
	switch st := store.(type) {
	case *sqliteStore:
		m.dbPools(sqlPoolCollector(st.rdb, "sqlite_read"), sqlPoolCollector(st.wdb, "sqlite_write"))
		m.writeGroups(st.GroupStats)
		var err error
		if a.backups, err = newBackups(cfg.backupDir(), cfg.BackupKeep, st, log, m); err != nil {
			return nil, err
		}
	case *postgresStore:
		m.dbPools(pgPoolCollector{st.Stat})
	}
	localSize := cfg.LocalCacheSize
	if cfg.CacheMemory == 0 {
		localSize = 0 // CACHE_MEMORY=0: no in-process caches
	}
	a.svc = NewProductService(store, ServiceConfig{
		Cache: c, RedisTimeout: cfg.RedisTimeout, LocalCacheSize: localSize, CacheMemory: cfg.CacheMemory,
		CacheTTL: cfg.CacheTTL, Logger: log, Metrics: m, Tracing: tr,
	})
	if cfg.AMQPURL != "" {
		rm := m.relay()
		a.relay = newRelay(store.(relayStore), relayConfig{
			Source: cfg.AMQPSource, Dial: dialRelayPublisher(cfg.AMQPURL, cfg.AMQPExchange, rm), BrokerURL: cfg.AMQPURL,
			WarnAge: cfg.RelayWarnAge, Log: log, Metrics: rm, Wake: a.svc.feed,
		})
	}
	a.handler = newServer(serverDeps{
		svc: a.svc, log: log, metrics: m, tokens: tokens, life: a.life,
		// Always made: failed authentication is limited even when
		// RATE_LIMIT_RPS is 0 and requests in general are not.
		limiter: newRateLimiter(cfg.RateLimitRPS, cfg.RateLimitBurst, tokens),
		proxies: cfg.TrustedProxies, maxFlight: cfg.MaxInFlight, serveMetrics: cfg.MetricsAddr == "", tracing: tr,
		streams: newStreamSlots(cfg.FeedMaxStreams), backups: a.backups, relay: a.relay,
	})
	return a, nil
}

// serve serves the API, and /metrics and the admin endpoints where they
// have listeners of their own, in the background.
func (a *app) serve(lns listeners, cfg *config, errc chan<- error) []*http.Server {
	servers := []*http.Server{serve(lns.main, a.handler, a.log, errc, newConnLimiter(cfg.MaxConns, cfg.MaxConnsPerIP, a.metrics, a.log))}
	a.log.Info("listening", "addr", lns.main.Addr().String())
	if lns.metrics != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", a.metrics.handler())
		servers = append(servers, serve(lns.metrics, mux, a.log, errc, nil))
		a.log.Info("metrics listening", "addr", lns.metrics.Addr().String())
	}
	if lns.admin != nil {
		servers = append(servers, serve(lns.admin, adminMux(a.metrics), a.log, errc, nil))
		a.log.Info("admin listening", "addr", lns.admin.Addr().String())
	}
	return servers
}

// startBackground starts the background work and returns what stops it
// and waits for it. Most of it stops when ctx ends (the shutdown signal);
// the follower serves reads, so it runs until the returned function is
// called, after the listeners drained.
func (a *app) startBackground(ctx context.Context, cfg *config, hup <-chan os.Signal) (stop func()) {
	var bg sync.WaitGroup
	bgCtx, bgCancel := context.WithCancel(ctx)
	followCtx, followCancel := context.WithCancel(context.WithoutCancel(ctx))
	bg.Go(func() { expireIdempotencyKeys(bgCtx, a.store, a.log) })
	bg.Go(func() { a.svc.Probe(bgCtx, time.Second) })
	bg.Go(func() { a.svc.Follow(followCtx) })
	bg.Go(func() { a.svc.SweepReservations(bgCtx, time.Second) })
	bg.Go(func() { trimChangeFeed(bgCtx, a.store, a.log, cfg.EventsRetention, time.Minute) })
	if a.backups != nil && cfg.BackupInterval > 0 {
		bg.Go(func() { a.backups.Schedule(bgCtx, cfg.BackupInterval) })
	}
	if a.relay != nil {
		bg.Go(func() { a.relay.Run(bgCtx) })
	}
	bg.Go(func() { a.tokens.watch(bgCtx, hup, tokensFilePoll, a.log) })
	return func() {
		bgCancel()
		followCancel()
		bg.Wait()
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
	every(ctx, 10*time.Minute, func() {
		n, err := store.ExpireIdempotencyKeys(ctx)
		if err != nil && ctx.Err() == nil {
			log.Warn("expire idempotency keys", "err", err.Error(), "deleted", n)
		} else if n > 0 {
			log.Info("expired idempotency keys", "deleted", n)
		}
	})
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
