package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// errCacheMiss is what a cache's Get returns when it holds nothing for a key.
var errCacheMiss = errors.New("cache miss")

// errStaleEpoch is what Push returns when the namespace it was given is no
// longer current: the caller learns the new one from Namespace.
var errStaleEpoch = errors.New("cache namespace changed")

// cache is the out-of-process product cache in front of the store, shared
// by every replica. Values carry the product version, and Put keeps the
// newer of what it holds and what it is given, so a slow read can never
// overwrite a newer write (the cache-aside race). Deletes are written as
// tombstones (nil JSON) at the next version.
type cache interface {
	// Get returns the product under namespace epoch: a miss when epoch is
	// no longer current, or stops being while Get runs.
	Get(ctx context.Context, epoch cacheEpoch, id int64) ([]byte, error)
	// Epoch names the current namespace. A reader takes it before reading
	// the database and fills under it: if the namespace changes meanwhile,
	// the fill lands where no read looks.
	Epoch() cacheEpoch
	// Put stores json at version under epoch's namespace, unless that holds
	// the same or a newer version, or epoch is no longer current.
	Put(ctx context.Context, epoch cacheEpoch, id, version int64, json []byte) error
	// Forget makes every entry written so far unreachable, for every
	// replica: the service calls it when a write could not update the
	// cache. The new, empty namespace is current as of change-log position
	// through (0 when the service does not follow a change log).
	Forget(through int64)
	// Namespace returns the current namespace and the change-log position
	// through which it is known to hold every product write (or nothing
	// for the product); see follower.
	Namespace(ctx context.Context) (cacheEpoch, int64, error)
	// Push stores items under epoch's namespace, each unless it holds the
	// same or a newer version, and records that the namespace holds every
	// write through change-log position through. It returns errStaleEpoch
	// when epoch is no longer current.
	Push(ctx context.Context, epoch cacheEpoch, items []cacheItem, through int64) error
	Ping(ctx context.Context) error
	Close() error
}

// cacheEpoch identifies a cache namespace as this process knows it.
type cacheEpoch uint64

// cacheItem is one product (or tombstone, nil JSON) for Push.
type cacheItem struct {
	ID      int64
	Version int64
	JSON    []byte
}

// noCache is the cache used when REDIS_URL is unset: it holds nothing.
type noCache struct{}

func (noCache) Get(context.Context, cacheEpoch, int64) ([]byte, error)      { return nil, errCacheMiss }
func (noCache) Epoch() cacheEpoch                                           { return 0 }
func (noCache) Put(context.Context, cacheEpoch, int64, int64, []byte) error { return nil }
func (noCache) Forget(int64)                                                {}
func (noCache) Namespace(context.Context) (cacheEpoch, int64, error)        { return 0, 0, nil }
func (noCache) Push(context.Context, cacheEpoch, []cacheItem, int64) error  { return nil }
func (noCache) Ping(context.Context) error                                  { return nil }
func (noCache) Close() error                                                { return nil }

// redisCache keeps products in Redis hashes {v: version, d: json} under
// keys "productsvc:g<generation>:product:<id>". The generation is shared by
// every replica: it lives in Redis, in the hash "productsvc:ns" as g (the
// generation) and t (the change-log position through which the generation
// holds every product write; see follower). Every script checks the
// generation first, atomically, so nothing is read from or written to a
// generation that was given up.
//
// A generation is given up (the next one started, empty) when a write could
// not reach Redis (Forget), and when Redis restarted (its run_id changed):
// it may have restarted from an old snapshot. Entries of old generations
// are never read again; they expire by TTL. Redis must not evict keys
// (maxmemory-policy noeviction, Redis's default): an evicted newer entry
// would let a late, older fill in.
type redisCache struct {
	client *redis.Client
	ttl    time.Duration

	ns      atomic.Pointer[namespace]
	pending atomic.Pointer[switchRequest] // a generation change not yet made

	runIDMu sync.Mutex
	runID   string
}

// namespace is one generation of keys as this process adopted it.
type namespace struct {
	epoch   cacheEpoch // this process's count of adoptions
	gen     string     // Redis's generation; "" until learned
	through int64      // its change-log position when adopted
}

// switchRequest asks for the next generation: from the one named (the one
// a failed write could not update), or from whatever is current when from
// is "" (Redis restarted).
type switchRequest struct {
	from    string
	through int64
}

const redisNSKey = "productsvc:ns"

// The scripts' first lines check the generation: on a mismatch they return
// {"ns", generation, through} and change nothing.
const checkGeneration = `
local g = redis.call('HGET', KEYS[1], 'g') or '0'
if g ~= ARGV[1] then return {'ns', g, redis.call('HGET', KEYS[1], 't') or '0'} end
`

// getScript returns {"hit", json} or {"miss"}.
var getScript = redis.NewScript(checkGeneration + `
local d = redis.call('HGET', KEYS[2], 'd')
if not d or d == '' then return {'miss'} end
return {'hit', d}
`)

// putScript stores a product unless the key already holds the same or a
// newer version. ARGV: generation, version, json, ttl in ms.
var putScript = redis.NewScript(checkGeneration + `
local cur = redis.call('HGET', KEYS[2], 'v')
if cur and tonumber(cur) >= tonumber(ARGV[2]) then return {'ok'} end
redis.call('HSET', KEYS[2], 'v', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {'ok'}
`)

// pushScript is putScript for KEYS[2..] with ARGV (version, json) pairs
// after generation, ttl and through, then raises t to through.
var pushScript = redis.NewScript(checkGeneration + `
for i = 2, #KEYS do
	local v = ARGV[2 * i]
	local cur = redis.call('HGET', KEYS[i], 'v')
	if not cur or tonumber(cur) < tonumber(v) then
		redis.call('HSET', KEYS[i], 'v', v, 'd', ARGV[2 * i + 1])
		redis.call('PEXPIRE', KEYS[i], ARGV[2])
	end
end
local t = redis.call('HGET', KEYS[1], 't')
if not t or tonumber(t) < tonumber(ARGV[3]) then redis.call('HSET', KEYS[1], 't', ARGV[3]) end
return {'ok'}
`)

// switchScript starts the next generation, current as of ARGV[2], if the
// current one is ARGV[1] (any when ARGV[1] is ""). Several replicas
// giving up one generation start one new one. It returns {"ns", g, t}.
var switchScript = redis.NewScript(`
local g = redis.call('HGET', KEYS[1], 'g') or '0'
if ARGV[1] == '' or g == ARGV[1] then
	g = tostring(tonumber(g) + 1)
	redis.call('HSET', KEYS[1], 'g', g, 't', ARGV[2])
end
return {'ns', g, redis.call('HGET', KEYS[1], 't') or '0'}
`)

// newRedisCache connects to the Redis at rawURL. Every call is bounded by
// timeout: a slow or dead Redis must cost a request at most that.
func newRedisCache(rawURL string, timeout, ttl time.Duration) (*redisCache, error) {
	opts, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, fmt.Errorf("parse REDIS_URL: %w", err)
	}
	c := &redisCache{ttl: ttl}
	c.ns.Store(&namespace{epoch: 1})

	// Fail fast instead of go-redis's 5 s defaults, and send nothing that
	// Redis 7.0 rejects (CLIENT SETINFO, CLIENT MAINT_NOTIFICATIONS).
	opts.DialTimeout = timeout
	opts.ReadTimeout = timeout
	opts.WriteTimeout = timeout
	opts.PoolTimeout = timeout
	opts.ContextTimeoutEnabled = true
	opts.MaxRetries = -1
	opts.DialerRetries = 1
	opts.Protocol = 2
	opts.DisableIdentity = true
	opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	opts.OnConnect = c.onConnect
	c.client = redis.NewClient(opts)
	return c, nil
}

// onConnect checks Redis's run_id on every new connection. A new run_id
// means Redis restarted, perhaps from an old snapshot: start a new
// generation.
func (c *redisCache) onConnect(ctx context.Context, cn *redis.Conn) error {
	info, err := cn.Info(ctx, "server").Result()
	if err != nil {
		c.pending.Store(&switchRequest{})
		return err
	}
	var id string
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(line, "run_id:"); ok {
			id = strings.TrimSpace(v)
		}
	}
	c.runIDMu.Lock()
	defer c.runIDMu.Unlock()
	if c.runID != "" && c.runID != id {
		c.pending.Store(&switchRequest{})
	}
	c.runID = id
	return nil
}

func (n *namespace) key(id int64) string {
	return "productsvc:g" + n.gen + ":product:" + strconv.FormatInt(id, 10)
}

// run runs script with keys and, after the namespace's generation, args.
// A reply naming another generation is adopted and reported as
// errStaleEpoch.
func (c *redisCache) run(ctx context.Context, ns *namespace, script *redis.Script, keys []string, args ...any) ([]any, error) {
	reply, err := script.Run(ctx, c.client, keys, append([]any{ns.gen}, args...)...).Slice()
	if err != nil {
		return nil, err
	}
	if g, t, ok := nsReply(reply); ok {
		if g != ns.gen {
			c.ns.CompareAndSwap(ns, &namespace{epoch: ns.epoch + 1, gen: g, through: t})
		}
		return nil, errStaleEpoch
	}
	return reply, nil
}

// nsReply reads a script's {"ns", generation, through} reply.
func nsReply(reply []any) (gen string, through int64, ok bool) {
	if len(reply) != 3 || reply[0] != "ns" {
		return "", 0, false
	}
	gen, _ = reply[1].(string)
	ts, _ := reply[2].(string)
	through, _ = strconv.ParseInt(ts, 10, 64)
	return gen, through, gen != ""
}

// settle makes a pending generation change, or learns the generation when
// this process does not know it yet. It returns the current namespace.
func (c *redisCache) settle(ctx context.Context) (*namespace, error) {
	ns := c.ns.Load()
	p := c.pending.Load()
	if p == nil && ns.gen != "" {
		return ns, nil
	}
	req := switchRequest{from: "-"} // learning: switch from a generation that cannot exist
	if p != nil {
		req = *p
	}
	reply, err := switchScript.Run(ctx, c.client, []string{redisNSKey}, req.from, req.through).Slice()
	if err != nil {
		return nil, err
	}
	g, t, ok := nsReply(reply)
	if !ok {
		return nil, fmt.Errorf("redis: unexpected reply %v", reply)
	}
	if p != nil {
		c.pending.CompareAndSwap(p, nil)
	}
	next := &namespace{epoch: ns.epoch + 1, gen: g, through: t}
	if !c.ns.CompareAndSwap(ns, next) {
		return c.ns.Load(), nil
	}
	return next, nil
}

// Get returns a miss when the namespace changed while it ran: the call may
// have been the first on a new connection to a Redis that restarted from an
// old snapshot (onConnect then asks for a new generation), and what it read
// is not to be trusted.
func (c *redisCache) Get(ctx context.Context, epoch cacheEpoch, id int64) ([]byte, error) {
	ns, err := c.settle(ctx)
	if err != nil {
		return nil, err
	}
	if ns.epoch != epoch {
		return nil, errCacheMiss
	}
	reply, err := c.run(ctx, ns, getScript, []string{redisNSKey, ns.key(id)})
	if errors.Is(err, errStaleEpoch) {
		return nil, errCacheMiss
	}
	if err != nil {
		return nil, err
	}
	if len(reply) != 2 || c.ns.Load() != ns || c.pending.Load() != nil {
		return nil, errCacheMiss
	}
	s, _ := reply[1].(string)
	return []byte(s), nil
}

func (c *redisCache) Epoch() cacheEpoch { return c.ns.Load().epoch }

func (c *redisCache) Put(ctx context.Context, epoch cacheEpoch, id, version int64, json []byte) error {
	ns, err := c.settle(ctx)
	if err != nil {
		return err
	}
	if ns.epoch != epoch {
		return nil // a newer namespace exists; this value belongs to none
	}
	_, err = c.run(ctx, ns, putScript, []string{redisNSKey, ns.key(id)}, version, json, c.ttl.Milliseconds())
	if errors.Is(err, errStaleEpoch) {
		return nil
	}
	return err
}

func (c *redisCache) Forget(through int64) {
	c.pending.Store(&switchRequest{from: c.ns.Load().gen, through: through})
}

func (c *redisCache) Namespace(ctx context.Context) (cacheEpoch, int64, error) {
	ns, err := c.settle(ctx)
	if err != nil {
		return 0, 0, err
	}
	return ns.epoch, ns.through, nil
}

func (c *redisCache) Push(ctx context.Context, epoch cacheEpoch, items []cacheItem, through int64) error {
	ns, err := c.settle(ctx)
	if err != nil {
		return err
	}
	if ns.epoch != epoch {
		return errStaleEpoch
	}
	keys := make([]string, 0, 1+len(items))
	args := make([]any, 0, 2+2*len(items))
	keys = append(keys, redisNSKey)
	args = append(args, c.ttl.Milliseconds(), through)
	for _, it := range items {
		keys = append(keys, ns.key(it.ID))
		args = append(args, it.Version, it.JSON)
	}
	_, err = c.run(ctx, ns, pushScript, keys, args...)
	return err
}

func (c *redisCache) Ping(ctx context.Context) error { return c.client.Ping(ctx).Err() }
func (c *redisCache) Close() error                   { return c.client.Close() }

// routeRedisLogs makes go-redis log through log. go-redis has one logger
// for the whole process (redis.SetLogger), not one per client, so this is
// global state, a departure from the house rule that the library leaves no
// way around: without it go-redis writes plain-text lines to stderr. run
// calls it once, before the client exists; in tests, the last service
// started is the one that logs. (OpenTelemetry's error handler is the one
// other such global; see routeOTelErrors.)
//
// A dead Redis makes go-redis log on every dial; that Redis went down and
// came back is logged once each by the redis circuit breaker.
func routeRedisLogs(log *slog.Logger) { redis.SetLogger(newLimitedLog(log, "redis client")) }
