package main

import (
	"sync"
	"time"
)

// localCache is the in-process layer of the product cache: encoded products
// by id, bounded in entries. A loopback Redis round trip costs more than an
// in-process SQLite point read, so hot products are answered from here and
// Redis holds what does not fit.
//
// It is never stale after an acknowledged write. Every write updates it after
// commit and before it is acknowledged, and each update bumps its shard's
// generation. Writes may report in any order (concurrent connections):
// an entry only ever moves to a higher version, and a delete leaves a
// tombstone one version above the deleted product. A reader takes the
// generation (token) before it reads the database and may fill only if no
// write has touched the shard since: a slow read can never put back a value
// that a write replaced.
type localCache struct {
	shards [localShards]localShard
	perCap int // entries per shard; 0 disables the cache
	ttl    time.Duration
	now    func() time.Time
}

const localShards = 64

type localShard struct {
	mu      sync.Mutex
	gen     uint64
	pending int // committed writes whose Redis update has not finished
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

func newLocalCache(size int, ttl time.Duration) *localCache {
	c := &localCache{ttl: ttl, now: time.Now}
	if size > 0 {
		c.perCap = (size + localShards - 1) / localShards // round up: size entries always fit
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
	gen uint64
	// redisFresh is false while a committed write in the shard has not yet
	// reached Redis: what Redis holds then may be older than the database.
	redisFresh bool
}

// token returns the token to pass to fill after reading id elsewhere.
func (c *localCache) token(id int64) fillToken {
	s := c.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	return fillToken{gen: s.gen, redisFresh: s.pending == 0}
}

// fill stores v for id if no write touched the shard since tok was taken.
func (c *localCache) fill(id int64, tok fillToken, v cachedProduct) {
	if c.perCap == 0 {
		return
	}
	s := c.shard(id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gen != tok.gen {
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
	s.gen++
	if toRedis {
		s.pending++
	}
	if c.perCap == 0 {
		return
	}
	c.putLocked(s, id, v)
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
	old, ok := s.entries[id]
	if ok && old.cached.Version > v.Version {
		return
	}
	if !ok && len(s.entries) >= c.perCap {
		// Evict an arbitrary entry: map iteration starts at a random place.
		for k := range s.entries {
			delete(s.entries, k)
			break
		}
	}
	s.entries[id] = localEntry{cached: v, expires: c.now().Add(c.ttl)}
}

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

// pageCache keeps encoded listing pages by their normalised query. Any
// committed write makes every page stale, so a write bumps one generation
// and fills must carry the generation they read under: listings are never
// stale after an acknowledged write. It pays off for read-mostly catalogs,
// which is what a storefront is.
type pageCache struct {
	mu      sync.Mutex
	gen     uint64
	max     int
	entries map[string]pageEntry
}

type pageEntry struct {
	gen  uint64
	json []byte
}

func newPageCache(max int) *pageCache {
	return &pageCache{max: max, entries: make(map[string]pageEntry)}
}

// get returns the page cached for key and the generation to fill with.
func (c *pageCache) get(key string) ([]byte, uint64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[key]
	if ok && e.gen == c.gen {
		return e.json, c.gen, true
	}
	return nil, c.gen, false
}

// fill stores a page read under generation gen, unless a write came since.
func (c *pageCache) fill(key string, gen uint64, json []byte) {
	if c.max == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	if _, ok := c.entries[key]; !ok && len(c.entries) >= c.max {
		for k := range c.entries {
			delete(c.entries, k)
			break
		}
	}
	c.entries[key] = pageEntry{gen: gen, json: json}
}

// written invalidates every page. Call it after a write commits.
func (c *pageCache) written() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	if len(c.entries) > 0 {
		clear(c.entries)
	}
}
