package main

import (
	"sync"
	"sync/atomic"
	"time"
)

// localCache is the in-process layer of the product cache: encoded products
// by id, bounded in entries and in bytes. A loopback Redis round trip costs more than an
// in-process SQLite point read, so hot products are answered from here and
// Redis holds what does not fit.
//
// It is never stale after an acknowledged write. Every write updates it after
// commit and before it is acknowledged, and each update bumps its shard's
// count of writes. Writes may report in any order (concurrent connections),
// so a cached entry only ever moves to a higher version, a delete leaves a
// tombstone one version above the deleted product, and a write never adds
// a product that is not cached (an eviction between two out-of-order
// reports would let the older in). A reader takes the
// count of writes (token) before it reads the database and may fill only if no
// write has touched the shard since: a slow read can never put back a value
// that a write replaced.
type localCache struct {
	shards   [localShards]localShard
	perCap   int // entries per shard; 0 disables the cache
	perBytes int // bytes per shard
	maxEntry int // larger products are not kept
	ttl      time.Duration
	now      func() time.Time
	bytes    atomic.Int64 // bytes held, across shards
}

const localShards = 64

type localShard struct {
	mu      sync.Mutex
	writes  uint64
	pending int // committed writes whose Redis update has not finished
	bytes   int // cost of entries
	entries map[int64]localEntry
}

type localEntry struct {
	cached  cachedProduct
	expires time.Time
}

// cachedProduct is an encoded product and the version it encodes.
type cachedProduct struct {
	JSON    []byte
	Version int64
}

// entryOverhead approximates what an entry costs besides its JSON: the map
// slot, the key and the slice header. Counting it keeps a flood of tiny
// entries bounded too.
const entryOverhead = 64

// newLocalCache returns a cache of at most size products and budget bytes
// (JSON plus entryOverhead each). A product larger than a quarter of a
// shard's share is not kept: one entry must not evict a shard's worth.
func newLocalCache(size, budget int, ttl time.Duration) *localCache {
	c := &localCache{ttl: ttl, now: time.Now}
	if size > 0 && budget >= localShards*entryOverhead {
		c.perCap = (size + localShards - 1) / localShards // round up: size entries always fit
		c.perBytes = budget / localShards
		c.maxEntry = c.perBytes / 4
	}
	for i := range c.shards {
		c.shards[i].entries = make(map[int64]localEntry)
	}
	return c
}

func (c *localCache) shard(id int64) *localShard {
	return &c.shards[uint64(id)%localShards]
}

// get returns the cached product for id.
func (c *localCache) get(id int64) (cachedProduct, bool) {
	if c.perCap == 0 {
		return cachedProduct{}, false
	}
	s := c.shard(id)
	s.mu.Lock()
	e, ok := s.entries[id]
	s.mu.Unlock()
	if !ok || e.cached.JSON == nil || c.now().After(e.expires) {
		return cachedProduct{}, false
	}
	return e.cached, true
}

// fillToken is taken before reading a product from Redis or the database.
type fillToken struct {
	writes uint64
	// redisFresh is false while a committed write in the shard has not yet
	// reached Redis: what Redis holds then may be older than the database.
	redisFresh bool
}

// token returns the token to pass to fill after reading id elsewhere.
func (c *localCache) token(id int64) fillToken {
	s := c.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	return fillToken{writes: s.writes, redisFresh: s.pending == 0}
}

// fill stores v for id if no write touched the shard since tok was taken.
func (c *localCache) fill(id int64, tok fillToken, v cachedProduct) {
	if c.perCap == 0 {
		return
	}
	s := c.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.writes != tok.writes {
		return
	}
	c.putLocked(s, id, v)
}

// written records a committed write: v is the new product, or a tombstone
// (nil JSON, the deleted version plus one) when the product was deleted.
// With toRedis set, the write still has to reach Redis, and published must
// be called once it has.
func (c *localCache) written(id int64, v cachedProduct, toRedis bool) {
	s := c.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	if toRedis {
		s.pending++
	}
	// Only an entry already here is replaced (by a higher version). A write
	// is never added when its product is not cached: writes may report out
	// of order, and an entry evicted between two reports would let the
	// older one in. Fills (with the generation above) add products.
	if _, ok := s.entries[id]; ok && c.perCap > 0 {
		c.putLocked(s, id, v)
	}
}

// published records that a write reported to written has reached Redis (or
// Redis was told to forget everything).
func (c *localCache) published(id int64) {
	s := c.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending--
}

// putLocked stores v unless the shard holds a higher version of id.
func (c *localCache) putLocked(s *localShard, id int64, v cachedProduct) {
	if old, ok := s.entries[id]; ok && old.cached.Version > v.Version {
		return
	}
	c.deleteLocked(s, id)
	cost := len(v.JSON) + entryOverhead
	if cost > c.maxEntry {
		return // too large to be worth its share: read it from Redis or SQLite
	}
	// Evict arbitrary entries until it fits: map iteration starts at a
	// random place. Each entry is at most a quarter of the shard, so this
	// frees room after a few deletions.
	for k := range s.entries {
		if len(s.entries) < c.perCap && s.bytes+cost <= c.perBytes {
			break
		}
		c.deleteLocked(s, k)
	}
	s.entries[id] = localEntry{cached: v, expires: c.now().Add(c.ttl)}
	s.bytes += cost
	c.bytes.Add(int64(cost))
}

func (c *localCache) deleteLocked(s *localShard, id int64) {
	if e, ok := s.entries[id]; ok {
		cost := len(e.cached.JSON) + entryOverhead
		s.bytes -= cost
		c.bytes.Add(-int64(cost))
		delete(s.entries, id)
	}
}

// clear drops every entry and bumps every shard's generation, so no read
// in flight fills.
func (c *localCache) clear() {
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		s.writes++
		for id := range s.entries {
			c.deleteLocked(s, id)
		}
		s.mu.Unlock()
	}
}

// size returns the bytes the cache holds (JSON plus overhead).
func (c *localCache) size() int64 { return c.bytes.Load() }

// len returns the number of cached entries.
func (c *localCache) len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n += len(s.entries)
		s.mu.Unlock()
	}
	return n
}

// pageCache keeps encoded listing pages by their normalised query, bounded
// in entries and in bytes. Any committed write makes every page stale, so a
// write bumps one generation and fills must carry the generation they read
// under: listings are never stale after an acknowledged write. It pays off
// for read-mostly catalogs, which is what a storefront is. Clients choose
// the keys, so the bound in bytes is what keeps a flood of distinct queries
// from growing the process.
type pageCache struct {
	mu       sync.Mutex
	writes   uint64
	max      int // entries
	maxBytes int
	maxEntry int // larger pages are not kept
	used     int
	bytes    atomic.Int64 // used, readable without the lock
	entries  map[string]pageEntry
}

type pageEntry struct {
	writes uint64
	json   []byte
}

// newPageCache returns a cache of at most max pages and budget bytes (key,
// JSON and entryOverhead each). A page larger than a 64th of the budget is
// not kept: a few huge pages would otherwise crowd out every other.
func newPageCache(max, budget int) *pageCache {
	c := &pageCache{entries: make(map[string]pageEntry)}
	if max > 0 && budget > 0 {
		c.max, c.maxBytes, c.maxEntry = max, budget, budget/64
	}
	return c
}

// get returns the page cached for key and the generation to fill with.
func (c *pageCache) get(key string) ([]byte, uint64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[key]
	if ok && e.writes == c.writes {
		return e.json, c.writes, true
	}
	return nil, c.writes, false
}

// fill stores a page read when the count of writes was writes, unless a write came since
// or the page is too large to be worth keeping.
func (c *pageCache) fill(key string, writes uint64, json []byte) {
	cost := len(key) + len(json) + entryOverhead
	if c.max == 0 || cost > c.maxEntry {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if writes != c.writes {
		return
	}
	c.deleteLocked(key)
	for k := range c.entries { // evict arbitrary pages until it fits
		if len(c.entries) < c.max && c.used+cost <= c.maxBytes {
			break
		}
		c.deleteLocked(k)
	}
	c.entries[key] = pageEntry{writes: writes, json: json}
	c.used += cost
	c.bytes.Store(int64(c.used))
}

func (c *pageCache) deleteLocked(key string) {
	if e, ok := c.entries[key]; ok {
		c.used -= len(key) + len(e.json) + entryOverhead
		delete(c.entries, key)
	}
}

// written invalidates every page. Call it after a write commits.
func (c *pageCache) written() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	if len(c.entries) > 0 {
		clear(c.entries)
	}
	c.used = 0
	c.bytes.Store(0)
}

// size returns the bytes the cache holds (keys, JSON and overhead).
func (c *pageCache) size() int64 { return c.bytes.Load() }
