package idempotency

import (
	"context"
	"crypto/sha256"
	"fmt"
	"hash/maphash"
	"math"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// memShardCount is the number of independently locked parts of a
	// [MemoryStore].
	memShardCount = 64

	// memDefaultMaxEntries is the default cap on records.
	memDefaultMaxEntries = 1_000_000

	// memDefaultMaxBytes is the default byte budget, 256 MiB.
	memDefaultMaxBytes = 256 << 20

	// memSweepMin is the fewest writes a shard takes between two inline
	// sweeps. Otherwise a shard is swept once its writes since the last
	// sweep reach half its records, so that each write pays for examining
	// two records at most, amortised.
	memSweepMin = 64

	// memShrinkMin is the peak below which a shard's map is never rebuilt
	// to give memory back: Go maps do not shrink when emptied.
	memShrinkMin = 256

	// memKeepEmpty is the largest peak at which a shard that empties keeps
	// its map, so that a quiet store claims and releases without
	// allocating.
	memKeepEmpty = 8

	// memFullSweepCost bounds how often a claim refused at the cap sweeps
	// the whole store: at most once per this much time per record held,
	// so that a flood of refused claims costs O(1) each, amortised.
	memFullSweepCost = time.Microsecond

	// memNotStoredReason is Response.NotStored of the record kept instead
	// of a response that did not fit in the byte budget.
	memNotStoredReason = "store_full"
)

// The byte budget of [WithMaxBytes] counts the bytes a record holds (key,
// token, fingerprint, header names and values, body) plus these estimates
// of what the heap spends around them, measured on 64-bit platforms.
const (
	// memKeyBytes is what a key costs: its 32-byte digest (see memKey).
	memKeyBytes = sha256.Size

	// memRecordOverhead is the fixed cost of a record: its slot in its
	// shard's map beyond the key (about 128 bytes, free slots included)
	// and the Record (112).
	memRecordOverhead = 240

	// memHeaderNameOverhead is the cost of each header name besides its
	// bytes: its memField.
	memHeaderNameOverhead = 40

	// memHeaderValueOverhead is the cost of each header value besides its
	// bytes: its string header in the values' slice.
	memHeaderValueOverhead = 16

	// memClaimReserve is what an in-flight claim sets aside beyond a
	// record's fixed cost, its key and its token, so that its completion
	// can always be kept as the not-stored record (a fingerprint of 32
	// bytes, the reason, a Location of up to 150 bytes) within the budget.
	memClaimReserve = 640
)

// MemoryStore is a [Store] that keeps records in the memory of one process.
// It is what [New] uses when [Config.Store] is nil. Use a shared store, such
// as the Redis store, when several processes serve the same keys.
//
// A MemoryStore is safe for concurrent use by multiple goroutines. Its
// records are split into independently locked shards, each a Go map, so
// parallel requests with different keys rarely wait for each other.
//
// Expiry is checked on every read, so an expired record is never returned.
// Expired records are also removed inline by writes, a shard at a time and
// amortised over them, so the store needs no goroutine; [WithSweepInterval]
// adds one for those who want memory back on an idle store. Released,
// deleted and expired records leave nothing behind.
//
// The store holds at most [WithMaxEntries] records and [WithMaxBytes] bytes
// of them. A claim of a new key that does not fit is refused with
// [ErrStoreFull]: the store never evicts a record that has not expired,
// since that could run a request twice. Keys that already exist are still
// served. A completion that does not fit keeps a small "not stored" record
// in place of the response (see [MemoryStore.Complete]).
//
// A completed record is kept as the [Record] passed to Complete, with its
// header as a slice of fields rather than a map (a map costs some 400
// bytes even for two names). Claim and Get return a new Record with a new
// header map whose values, like the body and the fingerprint, are the
// store's own: callers must not modify them. The store never blocks on I/O
// and ignores the contexts passed to its methods.
type MemoryStore struct {
	shards [memShardCount]memShard
	seed   maphash.Seed

	// now is the clock, for tests that move time by hand; nil means the
	// monotonic clock of time.Now. Store time is nanoseconds since epoch.
	now   func() time.Time
	epoch time.Time

	maxEntries int64
	maxBytes   int64
	entries    atomic.Int64 // records held, live or expired not yet removed
	bytes      atomic.Int64 // what they are charged against maxBytes

	// lastFullSweep is the store time of the last sweep of all shards made
	// for a claim refused at the cap, or math.MinInt64.
	lastFullSweep atomic.Int64

	// The background sweeper, when there is one.
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// memShard is one independently locked part of a [MemoryStore].
type memShard struct {
	mu      sync.Mutex
	records map[memKey]memEntry
	// writes counts the writes since the shard was last swept inline.
	writes int
	// peak is the most records the map held since it was made.
	peak int
}

// memKey is a key as a [MemoryStore] holds it. It holds no pointer, so the
// garbage collector never scans the keys of a shard's map.
//
// The middleware's keys are 64 lowercase hex characters (a hex SHA-256, see
// [StorageKey]); they are kept decoded. Any other string, such as a key a
// caller of the [Store] methods made up, is kept as its SHA-256 with hashed
// set. The flag keeps the two kinds apart: a string and the hex of its
// SHA-256 are two keys, as are a hex key in upper and in lower case. Two
// hashed keys meet only if SHA-256 collides.
type memKey struct {
	sum    [sha256.Size]byte
	hashed bool
}

// memKeyOf returns the memKey of key.
func memKeyOf(key string) memKey {
	var k memKey
	if len(key) == 2*len(k.sum) && memDecodeHex(&k.sum, key) {
		return k
	}
	return memKey{sum: sha256.Sum256([]byte(key)), hashed: true}
}

// memDecodeHex decodes s, of 2*len(dst) bytes, into dst, and reports
// whether s is all lowercase hex digits. dst is undefined when it is not.
func memDecodeHex(dst *[sha256.Size]byte, s string) bool {
	for i := range dst {
		hi, lo := memHexDigit(s[2*i]), memHexDigit(s[2*i+1])
		if hi > 0xf || lo > 0xf {
			return false
		}
		dst[i] = hi<<4 | lo
	}
	return true
}

// memHexDigit returns the value of the lowercase hex digit c, or 0xff.
func memHexDigit(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	}
	return 0xff
}

// memEntry is what a shard holds under a key.
type memEntry struct {
	// rec is the completed record, nil while the key is in flight. Its
	// Response.Header is nil: header holds it.
	rec    *Record
	header []memField
	// token is the owner's token while the key is in flight.
	token string
	// expires is the store time at which the lease (in flight) or the TTL
	// (completed) runs out.
	expires int64
	// size is what the entry is charged against the byte budget.
	size int64
	// watch, when not nil, is closed when the claim on the in-flight key
	// ends; see watch.
	watch chan struct{}
}

// memField is one header field of a completed record.
type memField struct {
	name   string
	values []string
}

// record returns a Record of the completed entry e for a caller: a copy of
// e.rec with a header map built from e.header.
func (e *memEntry) record() *Record {
	r := *e.rec
	if len(e.header) > 0 {
		h := make(http.Header, len(e.header))
		for _, f := range e.header {
			h[f.name] = f.values
		}
		r.Response.Header = h
	}
	return &r
}

// memFields returns the fields of h, sharing its value slices.
func memFields(h http.Header) []memField {
	if len(h) == 0 {
		return nil
	}
	fields := make([]memField, 0, len(h))
	for name, values := range h {
		fields = append(fields, memField{name: name, values: values})
	}
	return fields
}

// completed reports whether e holds a completed record.
func (e *memEntry) completed() bool { return e.rec != nil }

// owner returns the token that holds or completed the key.
func (e *memEntry) owner() string {
	if e.completed() {
		return e.rec.Token
	}
	return e.token
}

// end wakes the watchers of the claim in e, if any.
func (e *memEntry) end() {
	if e.watch != nil {
		close(e.watch)
		e.watch = nil
	}
}

// memoryOptions holds what [MemoryOption] values set.
type memoryOptions struct {
	maxEntries    int
	maxBytes      int64
	sweepInterval time.Duration
	now           func() time.Time // set by tests only
}

// MemoryOption configures a [MemoryStore] made by [NewMemoryStore].
type MemoryOption func(*memoryOptions)

// WithMaxEntries caps the number of records the store holds, in flight or
// completed. At the cap, claims of new keys fail with [ErrStoreFull]; no
// unexpired record is evicted. It panics if n is not positive. Default:
// 1,000,000.
func WithMaxEntries(n int) MemoryOption {
	if n <= 0 {
		panic("idempotency: WithMaxEntries needs a positive number of entries")
	}
	return func(o *memoryOptions) { o.maxEntries = n }
}

// WithMaxBytes caps the bytes the store's records hold: keys, tokens,
// fingerprints, header names and values, bodies, and an estimate of the
// heap the store and each record spend around them (a few hundred bytes
// per record). A claim of a new key that does not fit fails with
// [ErrStoreFull]; no unexpired record is evicted. A completion that does
// not fit keeps a small "not stored" record instead of the response (see
// [MemoryStore.Complete]). It panics if n is not positive. Default: 256 MiB.
func WithMaxBytes(n int64) MemoryOption {
	if n <= 0 {
		panic("idempotency: WithMaxBytes needs a positive number of bytes")
	}
	return func(o *memoryOptions) { o.maxBytes = n }
}

// WithSweepInterval starts a goroutine that removes expired records every
// d, until [MemoryStore.Close] is called. Zero means no goroutine: expired
// records are then removed inline by writes, which is enough for a store
// that is written to. It panics if d is negative. Default: 0.
func WithSweepInterval(d time.Duration) MemoryOption {
	if d < 0 {
		panic("idempotency: WithSweepInterval needs a non-negative interval")
	}
	return func(o *memoryOptions) { o.sweepInterval = d }
}

// NewMemoryStore returns an empty [MemoryStore] configured by opts. It
// starts a goroutine only when [WithSweepInterval] asks for one; call
// [MemoryStore.Close] to stop it.
func NewMemoryStore(opts ...MemoryOption) *MemoryStore {
	o := memoryOptions{maxEntries: memDefaultMaxEntries, maxBytes: memDefaultMaxBytes}
	for _, opt := range opts {
		opt(&o)
	}
	s := &MemoryStore{
		seed:       maphash.MakeSeed(),
		now:        o.now,
		epoch:      time.Now(),
		maxEntries: int64(o.maxEntries),
		maxBytes:   o.maxBytes,
	}
	if s.now != nil {
		s.epoch = s.now()
	}
	for i := range s.shards {
		s.shards[i].records = make(map[memKey]memEntry)
	}
	s.lastFullSweep.Store(math.MinInt64)
	if o.sweepInterval > 0 {
		s.stop = make(chan struct{})
		s.done = make(chan struct{})
		go s.sweepLoop(o.sweepInterval)
	}
	return s
}

var _ Store = (*MemoryStore)(nil)

// Claim takes key for token, holding it for lease, or returns the live
// record under key, as [Store] describes. Claim returns [ErrStoreFull] when key is new
// and the store is at its cap of entries or bytes even after removing
// expired records.
func (s *MemoryStore) Claim(_ context.Context, key, token string, lease time.Duration) (*Record, error) {
	k := memKeyOf(key)
	sh := s.shard(&k)
	size := memClaimSize(token)
	for swept := false; ; swept = true {
		now := s.clock()
		sh.mu.Lock()
		e, found := sh.records[k]
		live := found && now < e.expires
		switch {
		case live && e.completed():
			rec := e.record()
			sh.mu.Unlock()
			return rec, nil
		case live && e.token != token:
			rec := &Record{State: StateInFlight, Token: e.token, LeaseRemaining: time.Duration(e.expires - now)}
			sh.mu.Unlock()
			return rec, nil
		case live:
			// A claim re-sent by its owner: the same claim, from now.
			e.expires = memAdd(now, lease)
			sh.records[k] = e
			s.wrote(sh, now)
			sh.mu.Unlock()
			return nil, nil
		case found && s.charge(size-e.size):
			// Expired: take it over. That ends the previous claim, unless
			// it was this token's own.
			if e.owner() != token {
				e.end()
			}
			sh.records[k] = memEntry{token: token, expires: memAdd(now, lease), size: size, watch: e.watch}
			s.wrote(sh, now)
			sh.mu.Unlock()
			return nil, nil
		case !found && s.reserve(size):
			sh.records[k] = memEntry{token: token, expires: memAdd(now, lease), size: size}
			sh.peak = max(sh.peak, len(sh.records))
			s.wrote(sh, now)
			sh.mu.Unlock()
			return nil, nil
		}
		sh.mu.Unlock()
		if swept || !s.sweepAtCap(now) {
			return nil, ErrStoreFull
		}
	}
}

// Extend sets the lease of the in-flight key held by token to lease from
// now, or returns [ErrNotOwner].
func (s *MemoryStore) Extend(_ context.Context, key, token string, lease time.Duration) error {
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, ok := sh.live(k, now)
	if !ok || e.completed() || e.token != token {
		return ErrNotOwner
	}
	e.expires = memAdd(now, lease)
	sh.records[k] = e
	s.wrote(sh, now)
	return nil
}

// Complete stores rec under the in-flight key held by token, for ttl, or
// returns [ErrNotOwner] and writes nothing. From then on rec belongs to the
// store, which sets its State to [StateCompleted] and its Token to token,
// and keeps its header in a form of its own, leaving Response.Header nil.
// A Complete re-sent by the token that completed the key returns nil and
// changes nothing.
//
// When rec does not fit in the byte budget, the store keeps in its place a
// terminal record with the same token and fingerprint, the original status
// and Location header, and Response.NotStored "store_full", and returns an
// error wrapping [ErrStoreFull]: the key is completed all the same, so its
// retries get a problem response, never a second execution.
func (s *MemoryStore) Complete(_ context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if rec == nil {
		panic("idempotency: Complete needs a non-nil record")
	}
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, ok := sh.live(k, now)
	if !ok || e.owner() != token {
		return ErrNotOwner
	}
	if e.completed() {
		return nil // completed by this token already
	}
	rec.State, rec.Token, rec.LeaseRemaining = StateCompleted, token, 0
	var err error
	size := memRecordSize(rec)
	if !s.charge(size - e.size) {
		full := size
		rec = memNotStoredRecord(rec)
		size = memRecordSize(rec)
		// Keep it even past the budget: the claim set room aside for it,
		// and releasing the key instead could run the request twice.
		s.bytes.Add(size - e.size)
		err = fmt.Errorf("%w: the response (%d bytes) was replaced by a not-stored record", ErrStoreFull, full)
	}
	e.end()
	header := memFields(rec.Response.Header)
	rec.Response.Header = nil
	sh.records[k] = memEntry{rec: rec, header: header, expires: memAdd(now, ttl), size: size}
	s.wrote(sh, now)
	return err
}

// memNotStoredRecord returns the terminal record kept instead of rec when
// rec does not fit in the byte budget.
func memNotStoredRecord(rec *Record) *Record {
	r := &Record{
		State:       StateCompleted,
		Token:       rec.Token,
		Fingerprint: rec.Fingerprint,
		Response: Response{
			StatusCode: rec.Response.StatusCode,
			NotStored:  memNotStoredReason,
		},
	}
	if loc := rec.Response.Header.Values("Location"); len(loc) > 0 {
		r.Response.Header = http.Header{"Location": slices.Clone(loc)}
	}
	return r
}

// Release deletes the in-flight key held by token, or returns [ErrNotOwner]
// and deletes nothing. A completed key is never released.
func (s *MemoryStore) Release(_ context.Context, key, token string) error {
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, ok := sh.live(k, now)
	if !ok || e.completed() || e.token != token {
		return ErrNotOwner
	}
	s.remove(sh, k, e)
	sh.shrink()
	s.wrote(sh, now)
	return nil
}

// Get returns the live record under key, or nil when there is none: for an
// in-flight key a [Record] with the owner's token and the lease left.
func (s *MemoryStore) Get(_ context.Context, key string) (*Record, error) {
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, ok := sh.live(k, now)
	switch {
	case !ok:
		return nil, nil
	case e.completed():
		return e.record(), nil
	}
	return &Record{State: StateInFlight, Token: e.token, LeaseRemaining: time.Duration(e.expires - now)}, nil
}

// Delete removes the record under key, whatever its state. Deleting an
// absent key is not an error.
func (s *MemoryStore) Delete(_ context.Context, key string) error {
	sh, k, _ := s.lock(key)
	defer sh.mu.Unlock()
	if e, ok := sh.records[k]; ok {
		s.remove(sh, k, e)
		sh.shrink()
	}
	return nil
}

// watch returns a channel that is closed when the claim on the in-flight
// key ends: it is completed, released, deleted, swept after its lease ran
// out, or taken over. It returns nil when key is not in flight, so that
// the caller looks again at once. A lease that runs out closes nothing
// until the record is swept or taken over: a waiter bounds its wait by the
// lease. All watchers of a claim share one channel, which goes with the
// claim.
func (s *MemoryStore) watch(key string) <-chan struct{} {
	sh, k, now := s.lock(key)
	defer sh.mu.Unlock()
	e, ok := sh.live(k, now)
	if !ok || e.completed() {
		return nil
	}
	if e.watch == nil {
		e.watch = make(chan struct{})
		sh.records[k] = e
	}
	return e.watch
}

// Len returns the number of records the store holds: live ones, and
// expired ones not yet removed. It is meant for tests and metrics.
func (s *MemoryStore) Len() int { return int(s.entries.Load()) }

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

// shard returns the shard that holds k. The hash is seeded, so that a
// caller who chooses keys cannot crowd them into one shard.
func (s *MemoryStore) shard(k *memKey) *memShard {
	return &s.shards[maphash.Bytes(s.seed, k.sum[:])%memShardCount]
}

// lock locks the shard that holds key and returns it, with the key as the
// shard holds it and the store time.
func (s *MemoryStore) lock(key string) (*memShard, memKey, int64) {
	k := memKeyOf(key)
	sh := s.shard(&k)
	sh.mu.Lock()
	return sh, k, s.clock()
}

// live returns the entry under k if it has not expired at store time now.
// sh.mu must be held.
func (sh *memShard) live(k memKey, now int64) (memEntry, bool) {
	e, ok := sh.records[k]
	if !ok || now >= e.expires {
		return memEntry{}, false
	}
	return e, true
}

// reserve counts a new record of size bytes if both caps allow it.
func (s *MemoryStore) reserve(size int64) bool {
	if !memAddCapped(&s.entries, 1, s.maxEntries) {
		return false
	}
	if !s.charge(size) {
		s.entries.Add(-1)
		return false
	}
	return true
}

// charge adds delta bytes if the byte budget allows it. A negative delta
// always fits.
func (s *MemoryStore) charge(delta int64) bool {
	if delta <= 0 {
		s.bytes.Add(delta)
		return true
	}
	return memAddCapped(&s.bytes, delta, s.maxBytes)
}

// memAddCapped adds delta to n unless the sum would pass limit, and reports
// whether it did.
func memAddCapped(n *atomic.Int64, delta, limit int64) bool {
	for {
		old := n.Load()
		if old > limit-delta {
			return false
		}
		if n.CompareAndSwap(old, old+delta) {
			return true
		}
	}
}

// remove removes the entry e under k and wakes its watchers. sh.mu must be
// held.
func (s *MemoryStore) remove(sh *memShard, k memKey, e memEntry) {
	e.end()
	delete(sh.records, k)
	s.entries.Add(-1)
	s.bytes.Add(-e.size)
}

// shrink gives sh's memory back, since Go maps keep their size when
// emptied: it rebuilds the map once it holds an eighth of its peak, or
// nothing after more than a few records. Either costs no more than the
// records removed since the peak: O(1) amortised. sh.mu must be held.
func (sh *memShard) shrink() {
	n := len(sh.records)
	if (n == 0 && sh.peak > memKeepEmpty) || (sh.peak >= memShrinkMin && n <= sh.peak/8) {
		fresh := make(map[memKey]memEntry, n)
		for k, e := range sh.records {
			fresh[k] = e
		}
		sh.records, sh.peak = fresh, n
	}
}

// wrote counts a write to sh and sweeps sh once the writes since its last
// sweep reach half its records. sh.mu must be held.
func (s *MemoryStore) wrote(sh *memShard, now int64) {
	sh.writes++
	if sh.writes >= max(memSweepMin, len(sh.records)/2) {
		s.sweepShard(sh, now)
	}
}

// sweepShard removes the expired records of sh. sh.mu must be held.
func (s *MemoryStore) sweepShard(sh *memShard, now int64) {
	sh.writes = 0
	for k, e := range sh.records {
		if now >= e.expires {
			s.remove(sh, k, e)
		}
	}
	sh.shrink()
}

// sweepAll removes every expired record of the store, one shard at a time.
func (s *MemoryStore) sweepAll(now int64) {
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		s.sweepShard(sh, now)
		sh.mu.Unlock()
	}
}

// sweepAtCap sweeps the whole store for a claim refused at the cap, unless
// another sweep ran too recently: at most one per [memFullSweepCost] per
// record held. It reports whether it swept. No shard lock may be held.
func (s *MemoryStore) sweepAtCap(now int64) bool {
	last := s.lastFullSweep.Load()
	gap := s.entries.Load() * int64(memFullSweepCost)
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

// memClaimSize is what an in-flight claim by token is charged: a record's
// fixed cost, its key and token, and room for its not-stored record.
func memClaimSize(token string) int64 {
	return int64(memRecordOverhead + memKeyBytes + len(token) + memClaimReserve)
}

// memRecordSize is what a completed record is charged.
func memRecordSize(rec *Record) int64 {
	r := &rec.Response
	n := memRecordOverhead + memKeyBytes + len(rec.Token) + len(rec.Fingerprint) + len(r.Body) + len(r.NotStored)
	for name, values := range r.Header {
		n += memHeaderNameOverhead + len(name)
		for _, v := range values {
			n += memHeaderValueOverhead + len(v)
		}
	}
	return int64(n)
}

// memAdd returns now+d, saturating instead of overflowing for huge d.
func memAdd(now int64, d time.Duration) int64 {
	if d > 0 && int64(d) > math.MaxInt64-now {
		return math.MaxInt64
	}
	return now + int64(d)
}
