package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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

// cache is the out-of-process product cache in front of the store. Values carry the
// product version, and Put keeps the newer of what it holds and what it is
// given, so a slow read can never overwrite a newer write (the cache-aside
// race). Deletes are written as tombstones (nil JSON) at the next version.
type cache interface {
	Get(ctx context.Context, id int64) ([]byte, error)
	// Epoch names the current namespace. A reader takes it before reading
	// the database and fills under it: if the namespace changes meanwhile,
	// the fill lands where no read looks.
	Epoch() cacheEpoch
	// Put stores json at version under epoch's namespace, unless that holds
	// the same or a newer version, or epoch is no longer current.
	Put(ctx context.Context, epoch cacheEpoch, id, version int64, json []byte) error
	// Forget makes every entry written so far unreachable. The service calls
	// it when a write could not update the cache, so no stale entry survives.
	Forget()
	Ping(ctx context.Context) error
	Close() error
}

// cacheEpoch identifies a cache namespace.
type cacheEpoch uint64

// noCache is the cache used when REDIS_URL is unset: it holds nothing.
type noCache struct{}

func (noCache) Get(context.Context, int64) ([]byte, error)                  { return nil, errCacheMiss }
func (noCache) Epoch() cacheEpoch                                           { return 0 }
func (noCache) Put(context.Context, cacheEpoch, int64, int64, []byte) error { return nil }
func (noCache) Forget()                                                     {}
func (noCache) Ping(context.Context) error                                  { return nil }
func (noCache) Close() error                                                { return nil }

// redisCache keeps products in Redis hashes {v: version, d: json} under
// keys "productsvc:<namespace>:product:<id>". The namespace is random per
// process and changes whenever Forget is called or Redis restarts (its run_id
// changes), so entries from before a restart, an outage or an old snapshot
// are never read again; they expire by TTL.
type redisCache struct {
	client *redis.Client
	ttl    time.Duration

	ns atomic.Pointer[namespace]

	runIDMu sync.Mutex
	runID   string
}

// namespace is one generation of keys.
type namespace struct {
	epoch cacheEpoch
	name  string
}

// putScript stores a product unless the key already holds the same or a
// newer version. Redis runs it atomically.
var putScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
`)

// newRedisCache connects to the Redis at rawURL. Every call is bounded by
// timeout: a slow or dead Redis must cost a request at most that.
func newRedisCache(rawURL string, timeout, ttl time.Duration) (*redisCache, error) {
	opts, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, fmt.Errorf("parse REDIS_URL: %w", err)
	}
	c := &redisCache{ttl: ttl}
	c.Forget()

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
// means Redis restarted, perhaps from an old snapshot: forget everything.
func (c *redisCache) onConnect(ctx context.Context, cn *redis.Conn) error {
	info, err := cn.Info(ctx, "server").Result()
	if err != nil {
		c.Forget()
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
		c.Forget()
	}
	c.runID = id
	return nil
}

func (n *namespace) key(id int64) string {
	return "productsvc:" + n.name + ":product:" + strconv.FormatInt(id, 10)
}

// Get returns a miss when the namespace changed while it ran: the call may
// have been the first on a new connection to a Redis that restarted from an
// old snapshot (onConnect forgets), and what it read is not to be trusted.
func (c *redisCache) Get(ctx context.Context, id int64) ([]byte, error) {
	ns := c.ns.Load()
	b, err := c.client.HGet(ctx, ns.key(id), "d").Bytes()
	if errors.Is(err, redis.Nil) || err == nil && (len(b) == 0 || c.ns.Load() != ns) {
		return nil, errCacheMiss
	}
	return b, err
}

func (c *redisCache) Epoch() cacheEpoch { return c.ns.Load().epoch }

func (c *redisCache) Put(ctx context.Context, epoch cacheEpoch, id, version int64, json []byte) error {
	ns := c.ns.Load()
	if ns.epoch != epoch {
		return nil // a newer namespace exists; this value belongs to none
	}
	return putScript.Run(ctx, c.client, []string{ns.key(id)}, version, json, c.ttl.Milliseconds()).Err()
}

func (c *redisCache) Forget() {
	var b [8]byte
	rand.Read(b[:])
	for {
		old := c.ns.Load()
		next := &namespace{name: hex.EncodeToString(b[:])}
		if old != nil {
			next.epoch = old.epoch + 1
		}
		if c.ns.CompareAndSwap(old, next) {
			return
		}
	}
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
