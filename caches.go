package main

// The caches in front of the store, and the one type that owns them: the
// service reads through it and records its writes in it; the follower
// applies the other replicas' writes through it.

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/attribute"
)

// Cache results, as logged and counted.
const (
	cacheLocal   = "local"   // served from the in-process layer
	cacheHit     = "hit"     // served from Redis
	cacheMiss    = "miss"    // read from the database
	cacheSkipped = "skipped" // Redis not asked: its breaker is open
	cacheError   = "error"   // Redis asked and failed
)

// productCaches owns every copy of a product kept outside the store: the
// in-process product and page caches, Redis and its circuit breaker, and,
// when the service follows a shared store's change log (see follower), the
// log position those copies reflect and whether Redis can be trusted.
//
// It keeps three promises:
//   - No read is stale after an acknowledged write. The service records
//     each committed write (written, then publish) before acknowledging
//     it; the follower applies every other replica's write (apply) before
//     its fence lets a read use the caches.
//   - Redis answers a read only while it holds every applied event (or
//     something newer): the follower's events are pushed to Redis before
//     they are applied in memory, and Redis stops being trusted before an
//     event it missed is applied, until the missed events are pushed again.
//   - A fill never replaces a newer copy: every layer keeps the higher
//     version, and a fill carries what it read under (the local shard's
//     count of writes, Redis's generation).
type productCaches struct {
	local        *localCache
	pages        *pageCache
	redis        cache // noCache when Redis is not configured
	redisEnabled bool
	redisTimeout time.Duration // bound on each Redis call (REDIS_TIMEOUT)
	redisCB      *gobreaker.CircuitBreaker[struct{}]
	log          *slog.Logger
	metrics      *metrics
	trace        *tracing

	// followed is set when a follower keeps the caches coherent with a
	// change log; without one every write is this process's own.
	followed   bool
	applied    atomic.Int64  // events applied in memory through this seq
	redisTrust atomic.Uint64 // the generation in which Redis holds every applied event; 0: none

	// Touched by the follower's round loop only.
	redisGen     cacheGen // the generation the follower pushes to
	redisThrough int64    // ... which holds every event through this seq
	redisBehind  bool     // ... but may lack events applied without a seq
}

// newProductCaches returns the caches cfg describes (its defaults filled
// in by NewProductService). shared tells whether other processes write to
// the store: the caches then follow its change log.
func newProductCaches(cfg ServiceConfig, shared bool) *productCaches {
	c := &productCaches{
		local:        newLocalCache(cfg.LocalCacheSize, cfg.CacheMemory/2, cfg.CacheTTL),
		pages:        newPageCache(min(cfg.LocalCacheSize, maxCachedPages), cfg.CacheMemory/2),
		redis:        cfg.Cache,
		redisEnabled: cfg.Cache != nil,
		redisTimeout: cfg.RedisTimeout,
		log:          cfg.Logger,
		metrics:      cfg.Metrics,
		trace:        cfg.Tracing,
	}
	if c.redis == nil {
		c.redis = noCache{}
	}
	timeout := redisBreakerTimeout
	if cfg.BreakerTimeout > 0 {
		timeout = cfg.BreakerTimeout
	}
	c.redisCB = newBreaker("redis", redisBreakerFailures, timeout, func(err error) bool {
		return err == nil || errors.Is(err, errCacheMiss)
	}, c.log, c.metrics)
	// A replica of a shared store follows the change log even with no
	// cache to keep: it learns the other replicas' holds from it (holdClock).
	c.followed = shared
	if c.redisEnabled && !c.followed {
		// No change log to follow: what a previous process left in Redis
		// cannot be checked (it may have died between a commit and its
		// Redis update), so this one starts a new generation.
		c.redis.Forget(0)
	}
	c.metrics.cacheBytes(c.local.size, c.pages.size)
	return c
}

// redisCall runs fn through the Redis breaker, bounded by REDIS_TIMEOUT.
func (c *productCaches) redisCall(ctx context.Context, fn func(ctx context.Context) error) error {
	return guard(c.redisCB, func() error {
		ctx, cancel := context.WithTimeout(ctx, c.redisTimeout)
		defer cancel()
		return fn(ctx)
	})
}

// Reads.

// cached returns the product held in memory for id. It takes one shard
// lock and allocates nothing: it is the hot half of a read.
func (c *productCaches) cached(id int64) (cachedProduct, bool) { return c.local.get(id) }

// token returns the token a read takes before it reads id from Redis or
// the database, for fill.
func (c *productCaches) token(id int64) fillToken { return c.local.token(id) }

// fromRedis reads id from Redis when Redis may answer: it holds every
// applied event, and no write of tok's shard is still on its way to it. A
// hit is kept in memory too. Otherwise it returns what Redis said
// (cacheMiss when it was not asked) and the generation to fill in, taken
// before the caller reads the database: if a write that could not reach
// Redis (or a Redis restart) moves to a fresh generation meanwhile,
// nothing newer there would refuse the maybe older copy.
func (c *productCaches) fromRedis(ctx context.Context, id int64, tok fillToken) (cachedProduct, string, cacheGen) {
	source := cacheMiss
	if gen := c.redis.Generation(); tok.redisFresh && c.redisTrusted(gen) {
		var v cachedProduct
		v, source = c.redisGet(ctx, gen, id)
		if source == cacheHit {
			c.local.fill(id, tok, v)
			return v, source, gen
		}
	}
	return cachedProduct{}, source, c.redis.Generation()
}

// fill keeps v, read from the database after fromRedis returned source and
// gen, in memory and in Redis. A Redis that just failed or was skipped is
// not asked again: a read pays at most one REDIS_TIMEOUT for a failing
// Redis.
func (c *productCaches) fill(ctx context.Context, id int64, tok fillToken, gen cacheGen, source string, v cachedProduct) {
	if source == cacheMiss {
		c.redisPut(ctx, gen, id, v.Version, v.JSON)
	}
	c.local.fill(id, tok, v)
}

// page returns the listing page cached for key and the count of writes to fill
// with.
func (c *productCaches) page(key string) ([]byte, uint64, bool) { return c.pages.get(key) }

// fillPage keeps a page read when the count of writes was writes, unless a write came
// since.
func (c *productCaches) fillPage(key string, writes uint64, json []byte) {
	c.pages.fill(key, writes, json)
}

// redisTrusted reports whether Redis, in generation gen, holds every
// write applied in memory; see follower.
func (c *productCaches) redisTrusted(gen cacheGen) bool {
	if !c.followed {
		return c.redisEnabled
	}
	return c.redisEnabled && gen != 0 && c.redisTrust.Load() == uint64(gen)
}

// redisGet reads id from Redis in generation gen. The version is read
// from the JSON itself.
func (c *productCaches) redisGet(ctx context.Context, gen cacheGen, id int64) (cachedProduct, string) {
	if !c.redisEnabled {
		return cachedProduct{}, cacheMiss
	}
	var b []byte
	ctx, span := c.trace.start(ctx, "redis get product", attribute.String("db.system", "redis"))
	defer span.End()
	err := c.redisCall(ctx, func(ctx context.Context) error {
		var err error
		b, err = c.redis.Get(ctx, gen, id)
		return err
	})
	span.SetAttributes(attribute.Bool("cache.hit", err == nil))
	var result string
	switch {
	case err == nil:
		result = cacheHit
	case errors.Is(err, errCacheMiss):
		result = cacheMiss
	case errors.Is(err, ErrUnavailable):
		result = cacheSkipped
	default:
		result = cacheError
		c.log.Debug("redis get failed", "id", id, "err", err)
	}
	c.metrics.cacheRequest(result)
	if result != cacheHit {
		return cachedProduct{}, result
	}
	version, ok := versionOf(b)
	if !ok {
		return cachedProduct{}, cacheMiss
	}
	return cachedProduct{JSON: b, Version: version}, cacheHit
}

// versionOf finds the "version" member in an encoded product.
func versionOf(b []byte) (int64, bool) {
	const key = `,"version":`
	for i := 0; i+len(key) <= len(b); i++ {
		if string(b[i:i+len(key)]) == key {
			j := i + len(key)
			k := j
			for k < len(b) && b[k] >= '0' && b[k] <= '9' {
				k++
			}
			v, err := strconv.ParseInt(string(b[j:k]), 10, 64)
			return v, err == nil
		}
	}
	return 0, false
}

// redisPut writes a product (or a tombstone, nil JSON) to Redis in
// generation gen.
func (c *productCaches) redisPut(ctx context.Context, gen cacheGen, id, version int64, json []byte) {
	if !c.redisEnabled {
		return
	}
	ctx, span := c.trace.start(ctx, "redis put product", attribute.String("db.system", "redis"))
	defer span.End()
	err := c.redisCall(ctx, func(ctx context.Context) error {
		return c.redis.Put(ctx, gen, id, version, json)
	})
	if err != nil {
		c.log.Debug("redis put failed", "id", id, "err", err)
	}
}

// This process's writes.

// written records a committed write in the in-process layers, before the
// write is acknowledged, and returns what publish must bring to Redis.
// Writes may report in any order (several connections, several
// goroutines): the product cache keeps the higher version, and a delete
// leaves a tombstone that outranks the product.
func (c *productCaches) written(p Product, deleted bool) cachedProduct {
	v := cachedProduct{Version: p.Version}
	if deleted {
		v.Version++ // a tombstone outranks the deleted version
	} else {
		v.JSON = appendProduct(nil, &p)
	}
	c.local.written(p.ID, v, c.redisEnabled)
	c.pages.written()
	return v
}

// publish brings Redis up to date after a committed write, before the write
// is acknowledged. If Redis cannot be updated, the generation is given up
// instead: an acknowledged write is never followed by a stale read.
func (c *productCaches) publish(ctx context.Context, id int64, v cachedProduct) {
	if !c.redisEnabled {
		return
	}
	defer c.local.published(id)
	c.metrics.cacheInvalidation()
	ctx, span := c.trace.start(context.WithoutCancel(ctx), "redis put product", attribute.String("db.system", "redis"))
	defer span.End()
	err := c.redisCall(ctx, func(ctx context.Context) error {
		// A committed write is current in any generation: whichever is
		// current now (after any pending change) takes it.
		gen, _, err := c.redis.SettleGeneration(ctx)
		if err == nil {
			err = c.redis.Put(ctx, gen, id, v.Version, v.JSON)
		}
		return err
	})
	if err != nil {
		c.log.Debug("redis put failed", "id", id, "err", err)
		c.redis.Forget(c.position())
	}
}

// The change log, for the follower. Every method below but position is
// called by the follower's round loop only.

// position returns the change-log seq through which the caches hold every
// event (0 when no change log is followed).
func (c *productCaches) position() int64 { return c.applied.Load() }

// start records that the caches, empty so far, are current at the change
// log's head: every read fences first, and a write only replaces what is
// cached.
func (c *productCaches) start(head int64) { c.applied.Store(head) }

// apply applies es, which leave nothing unapplied through seq through:
// pushed to Redis first, when Redis holds every event applied so far, then
// to the in-process caches. It reports false when a push to Redis failed.
func (c *productCaches) apply(ctx context.Context, es []Event, through int64) bool {
	if len(es) == 0 {
		c.applied.Store(through)
		return true
	}
	items := productItems(es)
	ok := true
	if c.redisEnabled && c.redisGen != 0 && c.redisThrough >= c.applied.Load() {
		err := c.redisCall(ctx, func(ctx context.Context) error {
			return c.redis.Push(ctx, c.redisGen, items, through)
		})
		if err == nil {
			c.redisThrough = max(c.redisThrough, through)
		} else {
			ok = false
		}
	}
	if c.redisThrough < through || !ok || !c.redisEnabled || c.redisGen == 0 {
		// Before any reader can see the new versions in memory. Events
		// without a seq are not counted by redisThrough: a push of them
		// that did not happen is remembered apart.
		c.redisBehind = true
		c.redisTrust.Store(0)
	}
	for _, it := range items {
		c.local.written(it.ID, cachedProduct{JSON: it.JSON, Version: it.Version}, false)
	}
	if len(items) > 0 {
		c.pages.written()
	}
	c.metrics.changesApplied.Add(float64(len(es)))
	c.applied.Store(through) // after the caches: a read that sees it finds them current
	return ok
}

// resync moves the applied position to seq after events before it were
// trimmed unseen: everything cached in memory is dropped.
func (c *productCaches) resync(seq int64) {
	c.log.Warn("change log: events were trimmed before this replica applied them; in-process caches dropped", "seq", seq)
	c.redisTrust.Store(0)
	c.local.clear()
	c.pages.written()
	c.applied.Store(seq)
}

// adoptGeneration settles Redis's current generation. When it is not the
// one the follower pushes to, Redis stops being trusted and the follower
// pushes to the new one from the position it is known to hold every event
// through (events without a seq may be missing). It returns an error, and
// Redis is not trusted, when Redis cannot be asked.
func (c *productCaches) adoptGeneration(ctx context.Context) error {
	var gen cacheGen
	var through int64
	err := c.redisCall(ctx, func(ctx context.Context) error {
		var err error
		gen, through, err = c.redis.SettleGeneration(ctx)
		return err
	})
	if err != nil {
		c.redisTrust.Store(0)
		return err
	}
	if gen != c.redisGen {
		c.redisTrust.Store(0)
		c.redisGen, c.redisThrough, c.redisBehind = gen, through, true
	}
	return nil
}

// redisMissing returns the position after which Redis may lack applied
// events, and whether it lacks any. When it lacks more than maxRepush, it
// gives the generation up instead and returns errStaleGeneration.
func (c *productCaches) redisMissing() (after int64, missing bool, err error) {
	applied := c.applied.Load()
	if c.redisThrough >= applied && !c.redisBehind {
		return c.redisThrough, false, nil
	}
	if applied-c.redisThrough > maxRepush {
		return 0, false, c.giveUpGeneration()
	}
	return c.redisThrough, true, nil
}

// pushMissing pushes es, change-log events after redisMissing's position,
// to Redis. With them Redis holds every event through seq through and,
// when done, every event without a seq too.
func (c *productCaches) pushMissing(ctx context.Context, es []Event, through int64, done bool) error {
	err := c.redisCall(ctx, func(ctx context.Context) error {
		return c.redis.Push(ctx, c.redisGen, productItems(es), through)
	})
	if err != nil {
		return err
	}
	c.redisThrough = max(c.redisThrough, through)
	if done {
		c.redisBehind = false
	}
	return nil
}

// giveUpGeneration starts a new, empty generation, current at the applied
// position, when Redis lacks events that cannot be pushed again (too many,
// or trimmed). It returns errStaleGeneration: the follower adopts the new
// one next.
func (c *productCaches) giveUpGeneration() error {
	c.redis.Forget(c.applied.Load())
	return errStaleGeneration
}

// trustRedis lets reads use Redis, in the generation the follower pushes
// to, if it holds every applied event; else reads stop using it.
func (c *productCaches) trustRedis() {
	if c.redisThrough >= c.applied.Load() && !c.redisBehind {
		c.redisTrust.Store(uint64(c.redisGen))
	} else {
		c.redisTrust.Store(0)
	}
}

// distrustRedis stops reads from using Redis until trustRedis.
func (c *productCaches) distrustRedis() { c.redisTrust.Store(0) }

// productItems returns the cache entries es make: each product as it
// became, or a tombstone one version above a deleted product.
func productItems(es []Event) []cacheItem {
	var out []cacheItem
	for i := range es {
		e := &es[i]
		switch {
		case e.ProductID == 0:
		case e.Product != nil:
			out = append(out, cacheItem{ID: e.ProductID, Version: e.Version, JSON: appendProduct(nil, e.Product)})
		default: // deleted: the event's version is already one above
			out = append(out, cacheItem{ID: e.ProductID, Version: e.Version})
		}
	}
	return out
}

// Readiness and shutdown.

// ready checks Redis for /ready: "ok", "disabled" or "down". It goes
// through the Redis breaker, so readiness probes alone (no read traffic)
// notice Redis failing and recovering, and it is logged.
func (c *productCaches) ready(ctx context.Context) string {
	if !c.redisEnabled {
		return "disabled"
	}
	if err := c.redisCall(ctx, c.redis.Ping); err != nil {
		return "down"
	}
	return "ok"
}

// close closes the Redis client.
func (c *productCaches) close() error { return c.redis.Close() }
