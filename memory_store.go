package idempotency

import (
	"context"
	"hash/maphash"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Tuning of the memory store. The numbers trade a little work on each write
// for bounded garbage; none of them affects correctness, because expiry is
// checked on every read.
const (
	// memShardCount is the number of independently locked parts of the
	// store (a power of two).
	memShardCount = 64

	// memSweepBatch is how many records each write examines for expiry in
	// its own shard, going round the shard's records in order. Under steady
	// traffic it keeps the expired records that wait for removal to a small
	// fraction of the live ones (about 1/(2k-1) of them).
	memSweepBatch = 4

	// memShrinkMin is the high-water mark below which a shard is never
	// rebuilt to return memory.
	memShrinkMin = 256

	// memFullSweepCost bounds how often a store at its cap sweeps all its
	// records: at most once per this much time per record held, so that
	// a flood of claims at the cap costs O(1) per request, amortised.
	memFullSweepCost = time.Microsecond

	// memDefaultMaxEntries is the default cap on records.
	memDefaultMaxEntries = 1_000_000
)

// MemoryStore is a [Store] that keeps records in the memory of one process.
// It is what [New] uses when [Config.Store] is nil. Use a shared store, such
// as the Redis store, when several processes serve the same keys.
//
// A MemoryStore is safe for concurrent use by multiple goroutines. Its map
// is split into independently locked shards, so parallel requests with
// different keys rarely wait for each other.
//
// Expiry is checked on every read, so an expired record is never returned.
// Expired records are also removed inline, a few at a time on each write,
// so the store needs no background goroutine; [WithSweepInterval] adds one
// for those who want memory back on an idle store. Released, deleted and
// expired records leave nothing behind.
//
// The store holds at most [WithMaxEntries] records. At the cap it first
// sweeps expired records, then refuses new keys with [ErrStoreFull]: it
// never evicts a record that has not expired, since that could run a
// request twice. Keys that already exist are still served at the cap.
//
// The store never blocks on I/O and ignores the contexts passed to its
// methods. It keeps a completed record in a compact encoding (one string,
// the Redis store's format), about a third of the heap of a [Record] and its
// header map, and decodes a fresh copy for each Claim or Get.
type MemoryStore struct {
	shards [memShardCount]memShard

	seed       maphash.Seed
	now        func() time.Time
	epoch      time.Time
	maxEntries int64

	// count is the number of records held, live or expired but not yet
	// removed. Every write that adds or removes a record updates it, so it
	// has a cache line of its own, away from the read-mostly fields above.
	_     [64]byte
	count atomic.Int64
	_     [56]byte

	// lastFullSweep is the store time, in nanoseconds since epoch, of the
	// last sweep of all shards made because the store was at its cap.
	lastFullSweep atomic.Int64

	// The background sweeper, when there is one.
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// memShard is one independently locked part of a [MemoryStore]. Its
// records sit in a dense slice, found through an index by key, so that a
// sweep walks memory in order without hashing, and a removal moves the last
// record into the hole.
type memShard struct {
	mu      sync.Mutex
	index   map[string]int // key → position in entries; nil until used
	entries []memEntry
	// hand is where the inline sweep examines records next.
	hand int
	// peak is the largest len(entries) since the shard was last rebuilt.
	// Go maps never give memory back, so a shard that shrank far below its
	// peak copies its records into a new map and slice.
	peak int
	_    [8]byte // pads the shard to a cache line of its own
}

// memEntry is a record as a [MemoryStore] holds it.
type memEntry struct {
	key string
	// token is the owner token of the claim.
	token string
	// rec is the completed record in the compact encoding of the Redis
	// store (one string, about a third of the heap of a *Record and its
	// header map); "" while the key is in flight.
	rec string
	// expires is the store time, in nanoseconds since the store's epoch,
	// at which the lease (in flight) or the TTL (completed) runs out.
	expires int64
	// changed, made on the first Watch of an in-flight key, is closed when
	// the claim ends: completed, released, deleted, swept or taken over.
	changed chan struct{}
}

// notify wakes the watchers of e, if any. The shard's lock must be held.
func (e *memEntry) notify() {
	if e.changed != nil {
		close(e.changed)
		e.changed = nil
	}
}

// live reports whether e has not expired at store time now.
func (e *memEntry) live(now int64) bool { return now < e.expires }

// memoryOptions holds what [MemoryOption] values set.
type memoryOptions struct {
	maxEntries    int
	sweepInterval time.Duration
	now           func() time.Time
}

// MemoryOption configures a [MemoryStore] made by [NewMemoryStore].
type MemoryOption func(*memoryOptions)

// WithMaxEntries caps the number of records the store holds, in flight or
// completed, expired records not yet removed included. At the cap, new keys
// are refused with [ErrStoreFull] until records expire or are released. It
// panics if n is not positive. Default: 1,000,000.
func WithMaxEntries(n int) MemoryOption {
	if n <= 0 {
		panic("idempotency: WithMaxEntries needs a positive number of entries")
	}
	return func(o *memoryOptions) { o.maxEntries = n }
}

// WithSweepInterval starts a background goroutine that removes expired
// records every d, until [MemoryStore.Close] is called. Zero means no
// goroutine: expired records are then removed inline by writes, which is
// enough for a store that is written to. It panics if d is negative.
// Default: 0.
func WithSweepInterval(d time.Duration) MemoryOption {
	if d < 0 {
		panic("idempotency: WithSweepInterval needs a non-negative interval")
	}
	return func(o *memoryOptions) { o.sweepInterval = d }
}

// WithClock sets the function the store reads the time from, for tests
// that move time by hand. It panics if now is nil. Default: the monotonic
// clock of [time.Now].
func WithClock(now func() time.Time) MemoryOption {
	if now == nil {
		panic("idempotency: WithClock needs a non-nil clock")
	}
	return func(o *memoryOptions) { o.now = now }
}

// NewMemoryStore returns an empty [MemoryStore] configured by opts. It
// starts a goroutine only when [WithSweepInterval] asks for one; call
// [MemoryStore.Close] to stop it.
func NewMemoryStore(opts ...MemoryOption) *MemoryStore {
	o := memoryOptions{maxEntries: memDefaultMaxEntries}
	for _, opt := range opts {
		opt(&o)
	}
	s := &MemoryStore{
		seed:       maphash.MakeSeed(),
		now:        o.now,
		maxEntries: int64(o.maxEntries),
	}
	if s.now != nil {
		s.epoch = s.now()
	} else {
		s.epoch = time.Now()
	}
	s.lastFullSweep.Store(math.MinInt64)
	if o.sweepInterval > 0 {
		s.stop = make(chan struct{})
		s.done = make(chan struct{})
		go s.sweepLoop(o.sweepInterval)
	}
	return s
}

var (
	_ Store   = (*MemoryStore)(nil)
	_ Watcher = (*MemoryStore)(nil)
)

// Claim takes key for token, holding it for lease, or returns the live
// record under key, as [Store] describes. A completed record is decoded
// afresh for each call. Claim returns [ErrStoreFull] when key
// is new and the store is at its cap even after removing expired records.
func (s *MemoryStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*Record, error) {
	rec, enc, err := s.claimEncoded(ctx, key, token, lease)
	if enc != "" {
		return decodeRecord(enc)
	}
	return rec, err
}

// claimEncoded implements encodedStore: Claim, returning a completed record
// as its encoding.
func (s *MemoryStore) claimEncoded(_ context.Context, key, token string, lease time.Duration) (*Record, string, error) {
	sh := s.shard(key)
	swept := false
	for {
		now := s.clock()
		sh.mu.Lock()
		if i, ok := sh.index[key]; ok {
			e := &sh.entries[i]
			if e.live(now) && e.rec != "" {
				enc := e.rec
				sh.mu.Unlock()
				return nil, enc, nil
			}
			if e.live(now) && e.token != token {
				owner, left := e.token, time.Duration(e.expires-now)
				sh.mu.Unlock()
				return &Record{State: StateInFlight, Token: owner, LeaseRemaining: left}, "", nil
			}
			// Expired, or a claim re-sent by the owner: take it from now.
			if e.token != token {
				e.notify()
			}
			*e = memEntry{key: e.key, token: token, expires: memAdd(now, lease), changed: e.changed}
		} else if s.reserve() {
			sh.add(memEntry{key: key, token: token, expires: memAdd(now, lease)})
		} else {
			sh.mu.Unlock()
			if !swept && s.sweepAtCap(now) {
				swept = true
				continue
			}
			return nil, "", ErrStoreFull
		}
		s.sweepStep(sh, now)
		sh.mu.Unlock()
		return nil, "", nil
	}
}

// Extend sets the lease of the in-flight key held by token to lease from
// now, or returns [ErrNotOwner].
func (s *MemoryStore) Extend(_ context.Context, key, token string, lease time.Duration) error {
	sh := s.shard(key)
	now := s.clock()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.find(key, now)
	if e == nil || e.rec != "" || e.token != token {
		return ErrNotOwner
	}
	e.expires = memAdd(now, lease)
	s.sweepStep(sh, now)
	return nil
}

// Complete stores rec under the in-flight key held by token, for ttl, or
// returns [ErrNotOwner] and writes nothing. The store keeps an encoded copy
// of rec, with State [StateCompleted] and Token token. A Complete re-sent by
// the token that completed the key returns nil and changes nothing.
func (s *MemoryStore) Complete(_ context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if rec == nil {
		panic("idempotency: Complete needs a non-nil record")
	}
	return s.complete(key, token, func() string { return encodeRecord(token, rec) }, ttl)
}

// completeEncoded implements encodedStore: Complete for a record the
// middleware encoded.
func (s *MemoryStore) completeEncoded(_ context.Context, key, token string, enc []byte, ttl time.Duration) error {
	return s.complete(key, token, func() string { return string(enc) }, ttl)
}

// complete stores the record that encode returns under the in-flight key
// held by token, for ttl. encode runs only when the record is stored.
func (s *MemoryStore) complete(key, token string, encode func() string, ttl time.Duration) error {
	sh := s.shard(key)
	now := s.clock()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.find(key, now)
	if e == nil || e.token != token {
		return ErrNotOwner
	}
	if e.rec != "" {
		return nil // completed by this token already
	}
	e.rec = encode()
	e.expires = memAdd(now, ttl)
	e.notify()
	s.sweepStep(sh, now)
	return nil
}

// Release deletes the in-flight key held by token, or returns [ErrNotOwner]
// and deletes nothing. A completed key is never released.
func (s *MemoryStore) Release(_ context.Context, key, token string) error {
	sh := s.shard(key)
	now := s.clock()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	i, ok := sh.index[key]
	if !ok {
		return ErrNotOwner
	}
	if e := &sh.entries[i]; !e.live(now) || e.rec != "" || e.token != token {
		return ErrNotOwner
	}
	s.removeAt(sh, i)
	s.sweepStep(sh, now)
	return nil
}

// Get returns the live record under key, or nil when there is none. A
// completed record is decoded afresh; an in-flight one is a new [Record]
// with the owner's token and the lease left.
func (s *MemoryStore) Get(_ context.Context, key string) (*Record, error) {
	sh := s.shard(key)
	now := s.clock()
	sh.mu.Lock()
	e := sh.find(key, now)
	if e == nil || e.rec != "" {
		var enc string
		if e != nil {
			enc = e.rec
		}
		sh.mu.Unlock()
		if enc == "" {
			return nil, nil
		}
		return decodeRecord(enc)
	}
	owner, left := e.token, time.Duration(e.expires-now)
	sh.mu.Unlock()
	return &Record{State: StateInFlight, Token: owner, LeaseRemaining: left}, nil
}

// Delete removes the record under key, whatever its state. Deleting an
// absent key is not an error.
func (s *MemoryStore) Delete(_ context.Context, key string) error {
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if i, ok := sh.index[key]; ok {
		s.removeAt(sh, i)
	}
	return nil
}

// Watch returns a channel that is closed when the claim on the in-flight
// key ends: it is completed, released, deleted, or taken over after its
// lease ran out. It returns nil when key is not in flight, so the caller
// should look again at once. A lease that simply runs out closes nothing:
// a watcher bounds its wait by the lease. Watch implements [Watcher], so a
// request waiting for the key (Config.WaitForInFlight) wakes as soon as the
// key's owner finishes.
func (s *MemoryStore) Watch(key string) <-chan struct{} {
	sh := s.shard(key)
	now := s.clock()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.find(key, now)
	if e == nil || e.rec != "" {
		return nil
	}
	if e.changed == nil {
		e.changed = make(chan struct{})
	}
	return e.changed
}

// Len returns the number of records the store holds: live ones, and
// expired ones not yet removed. It is meant for tests and metrics.
func (s *MemoryStore) Len() int { return int(s.count.Load()) }

// Close stops the background sweeper, if [WithSweepInterval] started one,
// and waits for it to exit. The store stays usable, with inline removal of
// expired records only. Close is idempotent and always returns nil.
func (s *MemoryStore) Close() error {
	if s.stop == nil {
		return nil
	}
	s.closeOnce.Do(func() { close(s.stop) })
	<-s.done
	return nil
}

// clock returns the store time: nanoseconds since the store was made. The
// default clock reads only the monotonic clock, so a change of the wall
// clock moves no deadline.
func (s *MemoryStore) clock() int64 {
	if s.now == nil {
		return int64(time.Since(s.epoch))
	}
	return int64(s.now().Sub(s.epoch))
}

// shard returns the shard that holds key.
func (s *MemoryStore) shard(key string) *memShard {
	return &s.shards[maphash.String(s.seed, key)&(memShardCount-1)]
}

// reserve counts one more record if the cap allows it.
func (s *MemoryStore) reserve() bool {
	if s.count.Add(1) > s.maxEntries {
		s.count.Add(-1)
		return false
	}
	return true
}

// removeAt removes the record at position i of sh. sh.mu must be held.
func (s *MemoryStore) removeAt(sh *memShard, i int) {
	sh.removeAt(i)
	s.count.Add(-1)
}

// sweepStep removes the expired records among the next few that sh's hand
// reaches. Called on every write, it keeps expired records a bounded
// fraction of the live ones without a goroutine. sh.mu must be held.
func (s *MemoryStore) sweepStep(sh *memShard, now int64) {
	for n := 0; n < memSweepBatch && len(sh.entries) > 0; n++ {
		if sh.hand >= len(sh.entries) {
			sh.hand = 0
		}
		if sh.entries[sh.hand].live(now) {
			sh.hand++
		} else {
			s.removeAt(sh, sh.hand) // the last record moved here: examine it next
		}
	}
}

// sweepAll removes every expired record of the store, one shard at a time.
func (s *MemoryStore) sweepAll(now int64) {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for j := 0; j < len(sh.entries); {
			if sh.entries[j].live(now) {
				j++
			} else {
				s.removeAt(sh, j)
			}
		}
		sh.mu.Unlock()
	}
}

// find returns the live record under key, or nil. sh.mu must be held.
func (sh *memShard) find(key string, now int64) *memEntry {
	if i, ok := sh.index[key]; ok && sh.entries[i].live(now) {
		return &sh.entries[i]
	}
	return nil
}

// add appends e, whose key sh does not hold. sh.mu must be held.
func (sh *memShard) add(e memEntry) {
	if sh.index == nil {
		sh.index = make(map[string]int)
	}
	sh.index[e.key] = len(sh.entries)
	sh.entries = append(sh.entries, e)
	sh.peak = max(sh.peak, len(sh.entries))
}

// removeAt removes the record at position i, moving the last record into
// its place, and gives memory back once the shard holds far fewer records
// than at its peak. Positions below len(sh.entries) stay valid. sh.mu must
// be held.
func (sh *memShard) removeAt(i int) {
	sh.entries[i].notify()
	key := sh.entries[i].key
	last := len(sh.entries) - 1
	if i != last {
		sh.entries[i] = sh.entries[last]
		sh.index[sh.entries[i].key] = i
	}
	sh.entries[last] = memEntry{} // drop the references for the collector
	sh.entries = sh.entries[:last]
	delete(sh.index, key)

	if n := len(sh.entries); sh.peak >= memShrinkMin && n <= sh.peak/8 {
		// Go maps never shrink: copy. The copy costs n after at least 7n
		// removals, O(1) amortised.
		old := sh.entries
		sh.entries, sh.index, sh.peak = nil, nil, n
		if n > 0 {
			sh.entries = slices.Clone(old)
			sh.index = make(map[string]int, n)
			for j := range sh.entries {
				sh.index[sh.entries[j].key] = j
			}
		}
	}
}

// sweepAtCap sweeps the whole store for a claim refused at the cap, unless
// another sweep ran too recently: at most one per [memFullSweepCost] per
// record held, so that the work is amortised over many refused claims. It
// reports whether it swept; no shard lock may be held by the caller.
func (s *MemoryStore) sweepAtCap(now int64) bool {
	last := s.lastFullSweep.Load()
	gap := s.count.Load() * int64(memFullSweepCost)
	if last != math.MinInt64 && now-last < gap {
		return false
	}
	if !s.lastFullSweep.CompareAndSwap(last, now) {
		return false // another claim is sweeping
	}
	s.sweepAll(now)
	return true
}

// sweepLoop is the background sweeper started by [WithSweepInterval].
func (s *MemoryStore) sweepLoop(every time.Duration) {
	defer close(s.done)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-tick.C:
			s.sweepAll(s.clock())
		}
	}
}

// memAdd returns now+d, saturating instead of overflowing for huge d.
func memAdd(now int64, d time.Duration) int64 {
	if d > 0 && int64(d) > math.MaxInt64-now {
		return math.MaxInt64
	}
	return now + int64(d)
}
