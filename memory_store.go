package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
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

	// memKeepEmpty is the largest peak at which a shard that empties keeps
	// its memory: a few entries and an index of 8 or 16 slots. A quiet
	// store, whose shards
	// hold a record or two at a time, then allocates nothing to claim and
	// release.
	memKeepEmpty = 8

	// memFullSweepCost bounds how often a store at its cap sweeps all its
	// records: at most once per this much time per record held, so that
	// a flood of claims at the cap costs O(1) per request, amortised.
	memFullSweepCost = time.Microsecond

	// memDefaultMaxEntries is the default cap on records.
	memDefaultMaxEntries = 1_000_000

	// memShardMax is the most records one shard holds: its index keeps a
	// position plus one in 32 bits of a slot, and a table of up to 1<<32
	// slots. A shard that reaches it refuses new keys like a store at its
	// cap; it would take 128 GiB of entries alone.
	memShardMax = math.MaxInt32
)

// MemoryStore is a [Store] that keeps records in the memory of one process.
// It is what [New] uses when [Config.Store] is nil. Use a shared store, such
// as the Redis store, when several processes serve the same keys.
//
// A MemoryStore is safe for concurrent use by multiple goroutines. Its
// records are split into independently locked shards, so parallel requests
// with different keys rarely wait for each other.
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
//
// Each record held costs the garbage collector one pointer, to that string
// or, while the key is in flight, to the owner's token. The index by key
// holds no pointer at all, so the collector never scans it. The work of
// every collection grows with the records held; this keeps it small.
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
	mu sync.Mutex
	// index finds a record's position in entries by its key. It holds no
	// pointer, so the garbage collector never scans it: a map[string]int
	// would have it read every key of every record at each collection.
	index   memIndex
	entries []memEntry
	// expires holds, at the position of each record in entries, the store
	// time, in nanoseconds since the store's epoch, at which its lease (in
	// flight) or its TTL (completed) runs out. It is apart from entries so
	// that the sweep, which reads only expiries as it walks, reads eight of
	// them per cache line rather than one.
	expires []int64
	// watchers holds the channels Watch handed out, by key, each closed
	// and removed when the claim on its key ends. Watching is rare (only
	// requests that wait for an in-flight key), so the map is nil, and
	// costs a write nothing but a length check, until somebody watches;
	// it is dropped again when it empties, since Go maps never shrink.
	watchers map[memKey]chan struct{}
	// hand is where the inline sweep examines records next.
	hand int
	// peak is the largest len(entries) since the shard was last rebuilt.
	// Slices never give memory back, so a shard that shrank far below its
	// peak copies its records into new slices and rebuilds its index
	// smaller, and one that empties drops them all.
	peak int
	// Padding to two cache lines (128 bytes on 64-bit platforms), so that
	// shards locked by different goroutines do not share one.
	_ [24]byte
}

// memKey is a key as a [MemoryStore] indexes it: a tag byte and 32 bytes,
// with no pointer, so that the index costs the garbage collector nothing.
//
// The middleware's keys are 64 lowercase hex characters (a hex SHA-256, see
// [StorageKey]); they are decoded (tag memKeyHex), which is exact and
// cheap. Any other string, such as a key a caller of the [Store] methods
// made up, is replaced by its SHA-256 (tag memKeyHashed). The tags keep the
// two kinds apart: the hex of a SHA-256 and the key it was taken of are two
// keys, as are a hex key in upper and in lower case. Two hashed keys meet
// only if SHA-256 collides.
type memKey [1 + sha256.Size]byte

// The tags of a [memKey], in its first byte.
const (
	memKeyHex    = 1 // the rest is the decoded hex of the key
	memKeyHashed = 2 // the rest is the SHA-256 of the key
)

// memKeyOf returns the index key of key.
func memKeyOf(key string) memKey {
	var k memKey
	if len(key) == 2*sha256.Size && memDecodeHex(&k, key) {
		k[0] = memKeyHex
		return k
	}
	k[0] = memKeyHashed
	var sum [sha256.Size]byte
	var buf [256]byte
	if len(key) <= len(buf) {
		// Hash a copy on the stack: converting a string longer than the
		// compiler's own 32-byte buffer to []byte would allocate.
		sum = sha256.Sum256(buf[:copy(buf[:], key)])
	} else {
		sum = sha256.Sum256([]byte(key))
	}
	copy(k[1:], sum[:])
	return k
}

// memDecodeHex decodes the 64 characters of key into k[1:] and reports
// whether they all were lowercase hex digits. Upper case is refused, so that
// the two spellings of a hex key, which are different strings, stay
// different keys.
//
// It decodes eight digits at a time in a uint64, with no branch on their
// values. The middleware's keys are random, so a loop that branched on
// each digit being a letter or not would mispredict on about one digit in
// three: such a loop took ten times as long as this one on a varied set of
// keys (260ns against 26ns), which a benchmark of one key repeated hides.
func memDecodeHex(k *memKey, key string) bool {
	const (
		ones  = 0x0101010101010101
		highs = 0x8080808080808080 // the high bit of every byte
	)
	var buf [2 * sha256.Size]byte
	copy(buf[:], key)
	var bad uint64
	for i := range len(buf) / 8 {
		x := binary.LittleEndian.Uint64(buf[8*i:])
		// For bytes below 0x80, x + (0x80-lo) sets a byte's high bit when
		// it is at least lo, and x + (0x7f-hi) when it is above hi, with
		// no carry into the next byte. A byte from 0x80 up, whose sums may
		// carry, has its high bit set in x: the key is refused, whatever
		// the next byte then seems to be.
		digit := (x + (0x80-'0')*ones) &^ (x + (0x7f-'9')*ones)
		lower := (x + (0x80-'a')*ones) &^ (x + (0x7f-'f')*ones)
		bad |= x | ^(digit | lower)
		// The value of each digit: its low four bits, plus 9 for a letter
		// ('a' is 0x61). Then pack the pairs: the first digit of each is
		// the high half of its byte, and the bytes close up.
		v := x&(0x0f*ones) + (lower&highs)>>7*9
		w := (v<<4 | v>>8) & 0x00ff00ff00ff00ff
		w = (w | w>>8) & 0x0000ffff0000ffff
		w = (w | w>>16) & 0x00000000ffffffff
		binary.LittleEndian.PutUint32(k[1+4*i:], uint32(w))
	}
	return bad&highs == 0
}

// memEntry is a record as a [MemoryStore] holds it, in 56 bytes of which
// only val is a pointer; its expiry is kept apart, in memShard.expires.
type memEntry struct {
	// val is the owner's token while the key is in flight, and the record
	// in the record encoding (see encodeRecord) once it is completed. That
	// encoding begins with the token that completed the key, so the token
	// is read from there, as the Redis store's scripts read it, rather
	// than kept twice: that saves its bytes on every record, and spares
	// Complete a second allocation to join the token and the encoding.
	val string
	// key is the record's key in the shard's index, kept so that a removal
	// can update the index for the record moved into the hole.
	key memKey
	// done is set once the key is completed: val is then the record.
	done bool
	// frag is the key's hash fragment, as the index has it (see
	// memIndex), so that the index finds the entry's slot without hashing
	// its key again.
	frag uint32
}

// live reports whether the record at position i has not expired at store
// time now. sh.mu must be held.
func (sh *memShard) live(i int, now int64) bool { return now < sh.expires[i] }

// owner returns the token that holds the key (in flight) or completed it
// (from the header of the encoding: its length, then its bytes).
func (e *memEntry) owner() string {
	if !e.done {
		return e.val
	}
	return e.val[recordHeaderLen : recordHeaderLen+int(e.val[2])]
}

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
	_ Store        = (*MemoryStore)(nil)
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
	if len(token) > recordMaxTokenLen {
		// The record encoding, which names the token that completed a
		// key, has room for no longer one.
		return nil, "", fmt.Errorf("idempotency: memory store: token of %d bytes is longer than %d", len(token), recordMaxTokenLen)
	}
	k := memKeyOf(key)
	sh, frag := s.shard(&k)
	swept := false
	for {
		now := s.clock()
		sh.mu.Lock()
		if i, slot := sh.index.find(&k, frag, sh.entries); i >= 0 {
			e, live := &sh.entries[i], sh.live(i, now)
			if live && e.done {
				enc := e.val
				sh.mu.Unlock()
				return nil, enc, nil
			}
			if live && e.val != token {
				owner, left := e.val, time.Duration(sh.expires[i]-now)
				sh.mu.Unlock()
				return &Record{State: StateInFlight, Token: owner, LeaseRemaining: left}, "", nil
			}
			// Expired, or a claim re-sent by the owner: take it from now.
			// Taking over ends the previous claim and wakes its watchers;
			// the owner's claim again is the same claim, watched still.
			if e.owner() != token {
				sh.notify(k)
			}
			*e = memEntry{val: token, key: k, frag: frag}
			sh.expires[i] = memAdd(now, lease)
		} else if len(sh.entries) < memShardMax && s.reserve() {
			sh.add(memEntry{val: token, key: k, frag: frag}, slot, memAdd(now, lease))
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
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, i := sh.find(&k, now)
	if e == nil || e.done || e.val != token {
		return ErrNotOwner
	}
	sh.expires[i] = memAdd(now, lease)
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
// middleware encoded. The store finds the owner of a completed key in its
// encoding, so enc must name token as the token that completed it; it
// panics otherwise, since only a bug in this package can get that wrong.
func (s *MemoryStore) completeEncoded(_ context.Context, key, token string, enc []byte, ttl time.Duration) error {
	if len(enc) < recordHeaderLen+len(token) || int(enc[2]) != len(token) ||
		string(enc[recordHeaderLen:recordHeaderLen+len(token)]) != token {
		panic("idempotency: completeEncoded needs a record encoded for its token")
	}
	return s.complete(key, token, func() string { return string(enc) }, ttl)
}

// complete stores the record that encode returns under the in-flight key
// held by token, for ttl. encode runs only when the record is stored, and
// returns an encoding that names token as the token that completed the key.
func (s *MemoryStore) complete(key, token string, encode func() string, ttl time.Duration) error {
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, i := sh.find(&k, now)
	if e == nil || e.owner() != token {
		return ErrNotOwner
	}
	if e.done {
		return nil // completed by this token already
	}
	e.val, e.done = encode(), true
	sh.expires[i] = memAdd(now, ttl)
	sh.notify(k.key)
	s.sweepStep(sh, now)
	return nil
}

// Release deletes the in-flight key held by token, or returns [ErrNotOwner]
// and deletes nothing. A completed key is never released.
func (s *MemoryStore) Release(_ context.Context, key, token string) error {
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, i := sh.find(&k, now)
	if e == nil || e.done || e.val != token {
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
	sh, k, now := s.lock(key)
	e, i := sh.find(&k, now)
	if e == nil {
		sh.mu.Unlock()
		return nil, nil
	}
	if e.done {
		enc := e.val
		sh.mu.Unlock()
		return decodeRecord(enc)
	}
	owner, left := e.val, time.Duration(sh.expires[i]-now)
	sh.mu.Unlock()
	return &Record{State: StateInFlight, Token: owner, LeaseRemaining: left}, nil
}

// Delete removes the record under key, whatever its state. Deleting an
// absent key is not an error.
func (s *MemoryStore) Delete(_ context.Context, key string) error {
	sh, k, _ := s.lock(key)
	defer sh.mu.Unlock()
	if i, _ := sh.index.find(&k.key, k.frag, sh.entries); i >= 0 {
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
func (s *MemoryStore) watch(key string) <-chan struct{} {
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, _ := sh.find(&k, now)
	if e == nil || e.done {
		return nil
	}
	ch, ok := sh.watchers[k.key]
	if !ok {
		if sh.watchers == nil {
			sh.watchers = make(map[memKey]chan struct{})
		}
		ch = make(chan struct{})
		sh.watchers[k.key] = ch
	}
	return ch
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

// memFound is a key as a locked shard looks it up: its index key and its
// hash fragment.
type memFound struct {
	key  memKey
	frag uint32
}

// lock locks the shard that holds key and returns it, with key as the
// shard finds it and the store time, read just before.
func (s *MemoryStore) lock(key string) (sh *memShard, k memFound, now int64) {
	k.key = memKeyOf(key)
	sh, k.frag = s.shard(&k.key)
	now = s.clock()
	sh.mu.Lock()
	return sh, k, now
}

// shard returns the shard that holds the key k, and k's hash fragment in
// that shard's index (see memIndex). The hash is seeded, so that callers
// who choose their keys cannot crowd them into one shard or one stretch of
// its index. Its low bits choose the shard, its high 32 bits are the
// fragment.
func (s *MemoryStore) shard(k *memKey) (*memShard, uint32) {
	h := maphash.Bytes(s.seed, k[:])
	return &s.shards[h&(memShardCount-1)], uint32(h >> 32)
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
		if sh.live(sh.hand, now) {
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
			if sh.live(j, now) {
				j++
			} else {
				s.removeAt(sh, j)
			}
		}
		sh.mu.Unlock()
	}
}

// find returns the live record under k and its position, or nil. sh.mu
// must be held.
func (sh *memShard) find(k *memFound, now int64) (*memEntry, int) {
	if i, _ := sh.index.find(&k.key, k.frag, sh.entries); i >= 0 && sh.live(i, now) {
		return &sh.entries[i], i
	}
	return nil, -1
}

// add appends e, whose key sh does not hold, expiring at store time
// expires, and indexes it in slot, the empty slot the index found for it.
// The caller has checked that sh holds fewer than memShardMax records.
// sh.mu must be held.
func (sh *memShard) add(e memEntry, slot int, expires int64) {
	n := len(sh.entries)
	sh.index.insert(slot, e.frag, n, n+1)
	sh.entries = append(sh.entries, e)
	sh.expires = append(sh.expires, expires)
	sh.peak = max(sh.peak, len(sh.entries))
}

// notify wakes the watchers of the claim on k, if any, and forgets them.
// Every write that ends a claim calls it, so the common case, nobody
// watching anything in the shard, costs one length check. sh.mu must be
// held.
func (sh *memShard) notify(k memKey) {
	if len(sh.watchers) == 0 {
		return
	}
	if ch, ok := sh.watchers[k]; ok {
		close(ch)
		delete(sh.watchers, k)
		if len(sh.watchers) == 0 {
			sh.watchers = nil // give back what a burst of watchers grew
		}
	}
}

// removeAt removes the record at position i, moving the last record into
// its place, and gives memory back once the shard holds far fewer records
// than at its peak. Positions below len(sh.entries) stay valid. sh.mu must
// be held.
func (sh *memShard) removeAt(i int) {
	e := &sh.entries[i]
	sh.notify(e.key)
	sh.index.remove(sh.index.slotOf(e.frag, i))
	last := len(sh.entries) - 1
	if i != last {
		sh.entries[i] = sh.entries[last]
		sh.expires[i] = sh.expires[last]
		sh.index.move(sh.entries[i].frag, last, i)
	}
	sh.entries[last] = memEntry{} // drop the reference for the collector
	sh.entries, sh.expires = sh.entries[:last], sh.expires[:last]

	switch n := len(sh.entries); {
	case n == 0 && sh.peak > memKeepEmpty:
		// Emptied: give everything back, with nothing to copy. Without
		// this, a shard rebuilt below memShrinkMin would keep its index
		// for good. Growing again reallocates what the records added
		// since the peak paid for, O(1) amortised.
		sh.entries, sh.expires, sh.peak = nil, nil, 0
		sh.index.resize(0)
	case sh.peak >= memShrinkMin && n <= sh.peak/8:
		// Slices never shrink, nor does the index: copy. The copy costs
		// n, and the index's rebuild walks its peak-sized table, after at
		// least 7/8 of the peak was removed: O(1) amortised.
		sh.entries, sh.expires = slices.Clone(sh.entries), slices.Clone(sh.expires)
		sh.index.resize(n)
		sh.peak = n
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
