package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/singleflight"
)

// ProductService is the product catalog: validation, cache-aside reads
// through an in-process and an optional Redis layer (productCaches), and
// writes to the store behind circuit breakers.
type ProductService struct {
	store    productStore
	dbSystem string // the store's engine, for span names and attributes
	caches   *productCaches
	log      *slog.Logger
	metrics  *metrics
	trace    *tracing

	// Reads and writes have separate breakers: a full disk fails writes
	// while reads keep working, and must not take reads down with it.
	readCB  *gobreaker.CircuitBreaker[struct{}]
	writeCB *gobreaker.CircuitBreaker[struct{}]

	flight singleflight.Group
	holds  holdClock   // when the earliest open hold expires (holds.go)
	feed   *feedSignal // wakes change-feed streams after each write
	follow *follower   // nil unless the store is shared by other processes
}

// ServiceConfig configures NewProductService.
type ServiceConfig struct {
	Cache          cache // nil means no Redis
	RedisTimeout   time.Duration
	LocalCacheSize int // products in the in-process cache; 0 turns both in-process caches off
	// CacheMemory is the byte budget of the in-process caches, split between
	// products and listing pages. Zero means defaultCacheMemory.
	CacheMemory int
	CacheTTL    time.Duration
	Logger      *slog.Logger
	Metrics     *metrics // nil means a private registry nobody scrapes
	Tracing     *tracing // nil means no tracing
	// BreakerTimeout is how long a breaker stays open before it lets a probe
	// through. Zero means dbBreakerTimeout / redisBreakerTimeout.
	BreakerTimeout time.Duration
}

const (
	dbBreakerFailures    = 5 // consecutive database failures that open a DB breaker
	dbBreakerTimeout     = 5 * time.Second
	redisBreakerFailures = 3
	redisBreakerTimeout  = 2 * time.Second
)

// NewProductService returns a service over store.
func NewProductService(store productStore, cfg ServiceConfig) *ProductService {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = newMetrics(nil)
	}
	if cfg.Tracing == nil {
		cfg.Tracing = noTracing()
	}
	if cfg.RedisTimeout <= 0 {
		cfg.RedisTimeout = 100 * time.Millisecond
	}
	if cfg.CacheTTL <= 0 {
		cfg.CacheTTL = 5 * time.Minute
	}
	if cfg.CacheMemory <= 0 {
		cfg.CacheMemory = defaultCacheMemory
	}
	dbTimeout := dbBreakerTimeout
	if cfg.BreakerTimeout > 0 {
		dbTimeout = cfg.BreakerTimeout
	}
	log, shared := store.(sharedLog)
	s := &ProductService{
		store:    store,
		dbSystem: store.Backend(),
		caches:   newProductCaches(cfg, shared),
		log:      cfg.Logger,
		metrics:  cfg.Metrics,
		trace:    cfg.Tracing,
		readCB:   newBreaker("database_read", dbBreakerFailures, dbTimeout, isDBSuccess, cfg.Logger, cfg.Metrics),
		writeCB:  newBreaker("database_write", dbBreakerFailures, dbTimeout, isDBSuccess, cfg.Logger, cfg.Metrics),
		feed:     newFeedSignal(),
	}
	if s.caches.followed {
		s.follow = newFollower(log, s.caches, &s.holds, s.readCB, s.metrics, s.log)
	}
	s.metrics.productsStored(store.Count)
	return s
}

// newBreaker returns a circuit breaker for the dependency called name
// (see breakerDependency) that opens after failures consecutive failures
// (errors ok does not accept) and probes again after timeout. It logs and
// counts its transitions.
func newBreaker(name string, failures uint32, timeout time.Duration, ok func(error) bool, log *slog.Logger, m *metrics) *gobreaker.CircuitBreaker[struct{}] {
	m.breakerState(name, gobreaker.StateClosed)
	return gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        name,
		MaxRequests: 1,
		Timeout:     timeout,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= failures },
		OnStateChange: func(name string, from, to gobreaker.State) {
			// What an operator needs is the dependency failing and
			// recovering, once each: the breaker opening (WARN) and
			// closing (INFO). While it stays down the breaker goes
			// open → half-open → open every timeout; those are DEBUG.
			level, msg := slog.LevelDebug, "circuit breaker probing"
			switch {
			case to == gobreaker.StateClosed:
				level, msg = slog.LevelInfo, "circuit breaker closed: "+breakerDependency(name)+" back"
			case from == gobreaker.StateClosed && to == gobreaker.StateOpen:
				level, msg = slog.LevelWarn, "circuit breaker opened: "+breakerDependency(name)+" failing"
			}
			log.Log(context.Background(), level, msg,
				"breaker", name, "from", from.String(), "to", to.String())
			m.breakerTransition(name, from, to)
		},
		IsSuccessful: ok,
		// A client that went away says nothing about the dependency.
		IsExcluded: func(err error) bool { return errors.Is(err, context.Canceled) },
	})
}

// breakerDependency names what the breaker called name guards, with the
// verb that agrees with it ("Redis is", "database reads are"), for its log
// lines and its errors.
func breakerDependency(name string) string {
	switch name {
	case "redis":
		return "Redis is"
	case "database_read":
		return "database reads are"
	case "database_write":
		return "database writes are"
	}
	return name + " is"
}

// isDBSuccess counts everything but a database failure as a success for the
// breaker: not-found, validation and conflicts are the database working.
func isDBSuccess(err error) bool { return err == nil || !errors.Is(err, ErrUnavailable) }

// UnavailableError is a request refused because a dependency is failing.
// RetryAfter tells the client when to try again. It unwraps to ErrUnavailable.
type UnavailableError struct {
	Reason     string
	RetryAfter time.Duration
}

func (e *UnavailableError) Error() string { return e.Reason }
func (e *UnavailableError) Unwrap() error { return ErrUnavailable }

// dbSpan starts a span for a store call named after the engine, e.g.
// "postgres get product".
func (s *ProductService) dbSpan(ctx context.Context, name, op string) (context.Context, trace.Span) {
	system := s.dbSystem
	if system == "postgres" {
		system = "postgresql" // OpenTelemetry's name for it
	}
	return s.trace.start(ctx, s.dbSystem+" "+name,
		attribute.String("db.system", system), attribute.String("db.operation", op))
}

// write runs a store write through the write breaker, in a span.
func (s *ProductService) write(ctx context.Context, name string, fn func(ctx context.Context) error) error {
	ctx, span := s.dbSpan(ctx, name, "WRITE")
	defer span.End()
	return guard(s.writeCB, func() error { return fn(ctx) })
}

// guard runs fn through cb. While cb is open it fails at once with an
// *UnavailableError that names what cb guards.
func guard(cb *gobreaker.CircuitBreaker[struct{}], fn func() error) error {
	_, err := cb.Execute(func() (struct{}, error) { return struct{}{}, fn() })
	if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		return &UnavailableError{Reason: breakerDependency(cb.Name()) + " failing; circuit breaker " + cb.Name() + " is open", RetryAfter: 5 * time.Second}
	}
	var uerr *UnavailableError
	if errors.Is(err, ErrUnavailable) && !errors.As(err, &uerr) {
		return &UnavailableError{Reason: err.Error(), RetryAfter: time.Second}
	}
	return err
}

// Get returns the encoded product with id and which cache layer served it.
// It returns ErrNotFound, or an *UnavailableError when the database is
// failing and no cache holds the product.
func (s *ProductService) Get(ctx context.Context, id int64) (cachedProduct, string, error) {
	cached, err := s.fence(ctx)
	if err != nil {
		return cachedProduct{}, cacheMiss, err
	}
	s.expireDue(ctx, cached)
	if !cached {
		v, err := s.load(ctx, id)
		return v, cacheMiss, err
	}
	if v, ok := s.caches.cached(id); ok {
		s.metrics.localCache(true)
		return v, cacheLocal, nil
	}
	s.metrics.localCache(false)
	type result struct {
		v      cachedProduct
		source string
	}
	// Concurrent misses for one id share one read. The key carries the
	// shard's count of writes, so a read that arrives after a write committed
	// never joins a read that started before it. The shared read must not
	// die with the first caller's request, hence WithoutCancel; the store
	// bounds it with DB_TIMEOUT.
	tok := s.caches.token(id)
	key := strconv.FormatInt(id, 10) + "/" + strconv.FormatUint(tok.writes, 10)
	r, err, _ := s.flight.Do(key, func() (any, error) {
		ctx := context.WithoutCancel(ctx)
		v, source, gen := s.caches.fromRedis(ctx, id, tok)
		if source == cacheHit {
			return result{v, source}, nil
		}
		v, err := s.load(ctx, id)
		if err != nil {
			return nil, err
		}
		s.caches.fill(ctx, id, tok, gen, source, v)
		if source != cacheSkipped {
			source = cacheMiss // read from the database (Redis missed, failed, or could not be trusted yet)
		}
		return result{v, source}, nil
	})
	if err != nil {
		return cachedProduct{}, cacheMiss, err
	}
	res := r.(result)
	return res.v, res.source, nil
}

// load reads the product with id from the database, through the read
// breaker, and encodes it.
func (s *ProductService) load(ctx context.Context, id int64) (cachedProduct, error) {
	var p Product
	err := guard(s.readCB, func() error {
		ctx, span := s.dbSpan(ctx, "get product", "SELECT")
		defer span.End()
		var err error
		p, err = s.store.Get(ctx, id)
		return err
	})
	if err != nil {
		return cachedProduct{}, err
	}
	return cachedProduct{JSON: appendProduct(nil, &p), Version: p.Version}, nil
}

// fence makes sure the caches hold every write acknowledged by any
// replica before the call; see follower. It reports false when they do
// not yet and the read must go to the database. With a store no other
// process writes, every write is this process's own and already in the
// caches.
func (s *ProductService) fence(ctx context.Context) (cached bool, err error) {
	if s.follow == nil {
		return true, nil
	}
	err = s.follow.fence(ctx)
	if err != nil && errors.Is(err, errBacklog) {
		// The follower is more than a round behind the change log (this
		// replica was paused, or cut off from the database, while others
		// wrote). The database is not behind: the read is answered from
		// it, right and without an error, while the rounds catch up. A 503
		// would make a replica that works fail every read for as long as
		// the backlog lasts; the extra load on the database is what a cold
		// cache costs, and the read breaker bounds it.
		return false, nil
	}
	return err == nil, err
}

// Follow follows the store's change log until ctx ends, when other
// processes write to it too; see follower. It returns at once otherwise.
func (s *ProductService) Follow(ctx context.Context) {
	if s.follow != nil {
		s.follow.Run(ctx)
	}
}

// committed records a committed write before it is acknowledged: in the
// caches (in memory first, then in Redis), for the change-feed streams,
// and for the other replicas (its event is numbered and announced).
func (s *ProductService) committed(ctx context.Context, p Product, deleted bool) {
	v := s.caches.written(p, deleted)
	s.feed.notify()
	if s.follow != nil {
		s.follow.written()
	}
	s.caches.publish(ctx, p.ID, v)
}

// Create validates in and stores a new product. It reports whether the
// product is the replay of an earlier request with the same idem (then
// nothing was written now). It returns a *ValidationError, ErrConflict if
// the SKU is taken, ErrIdempotencyMismatch, or an *UnavailableError.
func (s *ProductService) Create(ctx context.Context, in ProductInput, idem *IdempotencyKey) (Product, bool, error) {
	if problems := in.Valid(); len(problems) > 0 {
		return Product{}, false, &ValidationError{Problems: problems}
	}
	var p Product
	in.apply(&p, false)
	var replayed bool
	err := s.write(ctx, "create product", func(ctx context.Context) error {
		var err error
		p, replayed, err = s.store.Create(ctx, actorFrom(ctx), p, idem)
		return err
	})
	if err != nil {
		return Product{}, false, err
	}
	if !replayed {
		s.committed(ctx, p, false)
	}
	return p, replayed, nil
}

// Replace replaces the writable fields of the product with id (PUT). Stock
// is kept when in omits it. It returns ErrNotFound, ErrPrecondition, a
// *ValidationError, ErrConflict or an *UnavailableError.
func (s *ProductService) Replace(ctx context.Context, id int64, in ProductInput, cond *IfMatch) (Product, error) {
	if problems := in.Valid(); len(problems) > 0 {
		return Product{}, &ValidationError{Problems: problems}
	}
	return s.update(ctx, id, ProductUpdate{Patch: in.patch(), IfMatch: cond})
}

// Patch applies a JSON merge patch to the product with id. Errors as Replace.
func (s *ProductService) Patch(ctx context.Context, id int64, patch ProductPatch, cond *IfMatch) (Product, error) {
	if problems := patch.Valid(); len(problems) > 0 {
		return Product{}, &ValidationError{Problems: problems}
	}
	return s.update(ctx, id, ProductUpdate{Patch: patch, IfMatch: cond})
}

// SetStock sets the stock of the product with id. Errors as Replace.
func (s *ProductService) SetStock(ctx context.Context, id, stock int64, cond *IfMatch) (Product, error) {
	if msg := validStock(stock); msg != "" {
		return Product{}, &ValidationError{Problems: map[string]string{"stock": msg}}
	}
	return s.update(ctx, id, ProductUpdate{Patch: ProductPatch{Stock: optional[int64]{Set: true, Value: stock}}, IfMatch: cond})
}

func (s *ProductService) update(ctx context.Context, id int64, u ProductUpdate) (Product, error) {
	var out Product
	var changed bool
	err := s.write(ctx, "update product", func(ctx context.Context) error {
		var err error
		out, changed, err = s.store.Update(ctx, actorFrom(ctx), id, u)
		return err
	})
	if err != nil {
		return Product{}, err
	}
	if changed {
		s.committed(ctx, out, false)
	}
	return out, nil
}

// AdjustStock adds delta to the stock of the product with id, atomically,
// and reports whether the result is the replay of an earlier request with
// the same idem. It returns ErrNotFound, ErrInsufficientStock (nothing
// changes), a *ValidationError for a zero or out-of-range delta, or an
// *UnavailableError.
func (s *ProductService) AdjustStock(ctx context.Context, id, delta int64, cond *IfMatch, idem *IdempotencyKey) (Product, bool, error) {
	if delta == 0 || delta < -maxStock || delta > maxStock {
		return Product{}, false, &ValidationError{Problems: map[string]string{"delta": "must be a non-zero integer from -1000000000000 to 1000000000000"}}
	}
	var p Product
	var replayed bool
	err := s.write(ctx, "adjust stock", func(ctx context.Context) error {
		var err error
		p, replayed, err = s.store.AdjustStock(ctx, actorFrom(ctx), id, delta, cond, idem)
		return err
	})
	if err != nil {
		return Product{}, false, err
	}
	if !replayed {
		s.committed(ctx, p, false)
	}
	return p, replayed, nil
}

// Delete removes the product with id. It returns ErrNotFound,
// ErrPrecondition, ErrReserved or an *UnavailableError.
func (s *ProductService) Delete(ctx context.Context, id int64, cond *IfMatch) error {
	var gone Product
	err := s.write(ctx, "delete product", func(ctx context.Context) error {
		var err error
		gone, err = s.store.Delete(ctx, actorFrom(ctx), id, cond)
		return err
	})
	if err != nil {
		return err
	}
	s.committed(ctx, gone, true)
	return nil
}

// maxCachedPages bounds the listing pages kept in memory; their bytes are
// bounded by half the cache budget.
const maxCachedPages = 1024

// defaultCacheMemory is the default CACHE_MEMORY: with it the whole process
// stays well under the 256Mi limit of deploy/kubernetes.
const defaultCacheMemory = 32 << 20

// ListJSON returns an encoded page of products for the query key (the
// normalised query string) and filter f, from the page cache when no write
// happened since it was cached. It returns an *UnavailableError when the
// database is failing.
func (s *ProductService) ListJSON(ctx context.Context, key string, f ListFilter) ([]byte, error) {
	cached, err := s.fence(ctx)
	if err != nil {
		return nil, err
	}
	s.expireDue(ctx, cached)
	var writes uint64
	if cached {
		b, w, ok := s.caches.page(key)
		if ok {
			return b, nil
		}
		writes = w
	}
	page, err := s.List(ctx, f)
	if err != nil {
		return nil, err
	}
	b := appendPage(make([]byte, 0, pageSizeHint(page)), page)
	if cached {
		s.caches.fillPage(key, writes, b)
	}
	return b, nil
}

// pageSizeHint estimates the encoded size of page, so that encoding it
// allocates once: with long descriptions, growing the buffer by doubling
// would allocate twice the page in garbage.
func pageSizeHint(page Page) int {
	n := 64 + len(page.NextCursor)
	for i := range page.Items {
		p := &page.Items[i]
		n += 320 + len(p.SKU) + len(p.Name) + len(p.Description) + len(p.Category)
	}
	return n + n/16 // escapes
}

// List returns a page of products. It returns an *UnavailableError when the
// database is failing.
func (s *ProductService) List(ctx context.Context, f ListFilter) (Page, error) {
	var page Page
	ctx, span := s.dbSpan(ctx, "list products", "SELECT")
	defer span.End()
	err := guard(s.readCB, func() error {
		var err error
		page, err = s.store.List(ctx, f)
		return err
	})
	return page, err
}

// breakerProbe is what Probe needs of the store: a read and a write that
// touch no client data.
type breakerProbe interface {
	Ping(ctx context.Context) error
	// ProbeWrite makes one small real write.
	ProbeWrite(ctx context.Context) error
}

// Probe runs until ctx ends. While a database breaker is not closed it
// sends a probe through it every interval, so a breaker closes by itself once
// the fault is gone, even when no client request comes to test it.
func (s *ProductService) Probe(ctx context.Context, interval time.Duration) {
	var store breakerProbe = s.store // the probe's needs, held to by the compiler
	every(ctx, interval, func() {
		if s.writeCB.State() != gobreaker.StateClosed {
			guard(s.writeCB, func() error { return store.ProbeWrite(ctx) })
		}
		if s.readCB.State() != gobreaker.StateClosed {
			guard(s.readCB, func() error { return store.Ping(ctx) })
		}
	})
}

// Readiness is the service's view of its dependencies, for /ready.
type Readiness struct {
	Database   string // "ok" or "down"
	Cache      string // "ok", "disabled" or "down"
	ReadState  gobreaker.State
	WriteState gobreaker.State
}

// CanServeReads reports whether reads can be answered.
func (r Readiness) CanServeReads() bool {
	return r.Database == "ok" && r.ReadState != gobreaker.StateOpen
}

// Ready checks the database and Redis.
func (s *ProductService) Ready(ctx context.Context) Readiness {
	r := Readiness{Database: "ok", ReadState: s.readCB.State(), WriteState: s.writeCB.State()}
	if r.ReadState != gobreaker.StateOpen {
		if err := s.store.Ping(ctx); err != nil {
			r.Database = "down"
		}
	}
	r.Cache = s.caches.ready(ctx)
	return r
}

// Close closes the cache. The store is closed by its owner.
func (s *ProductService) Close() error {
	if err := s.caches.close(); err != nil {
		return fmt.Errorf("close cache: %w", err)
	}
	return nil
}
