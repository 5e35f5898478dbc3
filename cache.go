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

// errStaleGeneration is what Push returns when the generation it was given
// is no longer current: the caller learns the new one from
// SettleGeneration.
var errStaleGeneration = errors.New("cache generation changed")

// cache is the out-of-process product cache in front of the store, shared
// by every replica. Values carry the product version, and Put keeps the
// newer of what it holds and what it is given, so a slow read can never
// overwrite a newer write (the cache-aside race). Deletes are written as
// tombstones (nil JSON) at the next version.
//
// Entries live in generations: giving a generation up (Forget) makes every
// entry in it unreachable at once, for every replica.
type cache interface {
	// Get returns the product in generation gen: a miss when gen is no
	// longer current, or stops being while Get runs.
	Get(ctx context.Context, gen cacheGen, id int64) ([]byte, error)
	// Generation names the current generation as this process last saw
	// it, without asking Redis. A reader takes it before reading the
	// database and fills under it: if the generation changes meanwhile,
	// the fill lands where no read looks.
	Generation() cacheGen
	// Put stores json at version in generation gen, unless that holds the
	// same or a newer version, or gen is no longer current.
	Put(ctx context.Context, gen cacheGen, id, version int64, json []byte) error
	// Forget gives the current generation up, for every replica: the
	// service calls it when a write could not update the cache. The next,
	// empty generation is current as of change-log position through (0
	// when the service does not follow a change log).
	Forget(through int64)
	// SettleGeneration makes a pending generation change, then returns the
	// current generation and the change-log position through which it is
	// known to hold every product write (or nothing for the product); see
	// follower.
	SettleGeneration(ctx context.Context) (cacheGen, int64, error)
	// Push stores items in generation gen, each unless it holds the same
	// or a newer version, and records that the generation holds every
	// write through change-log position through. It returns
	// errStaleGeneration when gen is no longer current.
	Push(ctx context.Context, gen cacheGen, items []cacheItem, through int64) error
	Ping(ctx context.Context) error
	Close() error
}

// cacheGen identifies a generation as this process adopted it: its count
// of adoptions, not Redis's generation number, which a Redis that lost
// its data gives out again. 0 is none.
type cacheGen uint64

// cacheItem is one product (or tombstone, nil JSON) for Push.
type cacheItem struct {
	ID      int64
	Version int64
	JSON    []byte
}

// noCache is the cache used when REDIS_URL is unset: it holds nothing.
type noCache struct{}

func (noCache) Get(context.Context, cacheGen, int64) ([]byte, error)      { return nil, errCacheMiss }
func (noCache) Generation() cacheGen                                      { return 0 }
func (noCache) Put(context.Context, cacheGen, int64, int64, []byte) error { return nil }
func (noCache) Forget(int64)                                              {}
func (noCache) SettleGeneration(context.Context) (cacheGen, int64, error) { return 0, 0, nil }
func (noCache) Push(context.Context, cacheGen, []cacheItem, int64) error  { return nil }
func (noCache) Ping(context.Context) error                                { return nil }
func (noCache) Close() error                                              { return nil }

// redisCache keeps products in Redis hashes {v: version, d: json} under
// keys "productsvc:g<generation>:product:<id>". The generation is shared by
// every replica: it lives in Redis, in the hash "productsvc:ns" as g (the
// generation's number) and t (the change-log position through which the
// generation holds every product write; see follower). Every script checks
// the generation first, atomically, so nothing is read from or written to
// a generation that was given up.
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

	gen     atomic.Pointer[generation]
	pending atomic.Pointer[switchRequest] // a generation change not yet made

	runIDMu sync.Mutex
	runID   string
}

// generation is one generation of keys as this process adopted it.
type generation struct {
	id      cacheGen // this process's count of adoptions
	number  string   // Redis's number for it, in its keys; "" until learned
	through int64    // its change-log position when adopted
}

// switchRequest asks for the next generation: from the one named (the one
// a failed write could not update), or from whatever is current when from
// is "" (Redis restarted).
type switchRequest struct {
	from    string
	through int64
}

// generationKey is the hash that holds the current generation. Its name
// predates the word "generation"; it stays, since replicas of older and
// newer releases share one Redis during an upgrade.
const generationKey = "productsvc:ns"

// The scripts' first lines check the generation: on a mismatch they return
// {"gen", generation, through} and change nothing.
const checkGeneration = `
local g = redis.call('HGET', KEYS[1], 'g') or '0'
if g ~= ARGV[1] then return {'gen', g, redis.call('HGET', KEYS[1], 't') or '0'} end
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
// giving up one generation start one new one. It returns {"gen", g, t}.
var switchScript = redis.NewScript(`
local g = redis.call('HGET', KEYS[1], 'g') or '0'
if ARGV[1] == '' or g == ARGV[1] then
	g = tostring(tonumber(g) + 1)
	redis.call('HSET', KEYS[1], 'g', g, 't', ARGV[2])
end
return {'gen', g, redis.call('HGET', KEYS[1], 't') or '0'}
`)

// newRedisCache connects to the Redis at rawURL. Every call is bounded by
// timeout: a slow or dead Redis must cost a request at most that.
func newRedisCache(rawURL string, timeout, ttl time.Duration) (*redisCache, error) {
	opts, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, fmt.Errorf("parse REDIS_URL: %w", err)
	}
	c := &redisCache{ttl: ttl}
	c.gen.Store(&generation{id: 1})

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

func (g *generation) key(id int64) string {
	return "productsvc:g" + g.number + ":product:" + strconv.FormatInt(id, 10)
}

// run runs script with keys and, after the generation's number, args. A
// reply naming another generation is adopted and reported as
// errStaleGeneration.
func (c *redisCache) run(ctx context.Context, cur *generation, script *redis.Script, keys []string, args ...any) ([]any, error) {
	reply, err := script.Run(ctx, c.client, keys, append([]any{cur.number}, args...)...).Slice()
	if err != nil {
		return nil, err
	}
	if n, t, ok := generationReply(reply); ok {
		if n != cur.number {
			c.gen.CompareAndSwap(cur, &generation{id: cur.id + 1, number: n, through: t})
		}
		return nil, errStaleGeneration
	}
	return reply, nil
}

// generationReply reads a script's {"gen", number, through} reply.
func generationReply(reply []any) (number string, through int64, ok bool) {
	if len(reply) != 3 || reply[0] != "gen" {
		return "", 0, false
	}
	number, _ = reply[1].(string)
	ts, _ := reply[2].(string)
	through, _ = strconv.ParseInt(ts, 10, 64)
	return number, through, number != ""
}

// settle makes a pending generation change, or learns the generation when
// this process does not know it yet. It returns the current generation.
func (c *redisCache) settle(ctx context.Context) (*generation, error) {
	cur := c.gen.Load()
	p := c.pending.Load()
	if p == nil && cur.number != "" {
		return cur, nil
	}
	req := switchRequest{from: "-"} // learning: switch from a generation that cannot exist
	if p != nil {
		req = *p
	}
	reply, err := switchScript.Run(ctx, c.client, []string{generationKey}, req.from, req.through).Slice()
	if err != nil {
		return nil, err
	}
	n, t, ok := generationReply(reply)
	if !ok {
		return nil, fmt.Errorf("redis: unexpected reply %v", reply)
	}
	if p != nil {
		c.pending.CompareAndSwap(p, nil)
	}
	next := &generation{id: cur.id + 1, number: n, through: t}
	if !c.gen.CompareAndSwap(cur, next) {
		return c.gen.Load(), nil
	}
	return next, nil
}

// Get returns a miss when the generation changed while it ran: the call
// may have been the first on a new connection to a Redis that restarted
// from an old snapshot (onConnect then asks for a new generation), and
// what it read is not to be trusted.
func (c *redisCache) Get(ctx context.Context, gen cacheGen, id int64) ([]byte, error) {
	cur, err := c.settle(ctx)
	if err != nil {
		return nil, err
	}
	if cur.id != gen {
		return nil, errCacheMiss
	}
	reply, err := c.run(ctx, cur, getScript, []string{generationKey, cur.key(id)})
	if errors.Is(err, errStaleGeneration) {
		return nil, errCacheMiss
	}
	if err != nil {
		return nil, err
	}
	if len(reply) != 2 || c.gen.Load() != cur || c.pending.Load() != nil {
		return nil, errCacheMiss
	}
	s, _ := reply[1].(string)
	return []byte(s), nil
}

func (c *redisCache) Generation() cacheGen { return c.gen.Load().id }

func (c *redisCache) Put(ctx context.Context, gen cacheGen, id, version int64, json []byte) error {
	cur, err := c.settle(ctx)
	if err != nil {
		return err
	}
	if cur.id != gen {
		return nil // a newer generation exists; this value belongs to none
	}
	_, err = c.run(ctx, cur, putScript, []string{generationKey, cur.key(id)}, version, json, c.ttl.Milliseconds())
	if errors.Is(err, errStaleGeneration) {
		return nil
	}
	return err
}

func (c *redisCache) Forget(through int64) {
	c.pending.Store(&switchRequest{from: c.gen.Load().number, through: through})
}

func (c *redisCache) SettleGeneration(ctx context.Context) (cacheGen, int64, error) {
	cur, err := c.settle(ctx)
	if err != nil {
		return 0, 0, err
	}
	return cur.id, cur.through, nil
}

func (c *redisCache) Push(ctx context.Context, gen cacheGen, items []cacheItem, through int64) error {
	cur, err := c.settle(ctx)
	if err != nil {
		return err
	}
	if cur.id != gen {
		return errStaleGeneration
	}
	keys := make([]string, 0, 1+len(items))
	args := make([]any, 0, 2+2*len(items))
	keys = append(keys, generationKey)
	args = append(args, c.ttl.Milliseconds(), through)
	for _, it := range items {
		keys = append(keys, cur.key(it.ID))
		args = append(args, it.Version, it.JSON)
	}
	_, err = c.run(ctx, cur, pushScript, keys, args...)
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
