package idempotency_test

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/storetest"
)

// memTestClock is a fake clock that moves only when told to.
type memTestClock struct {
	mu  sync.Mutex
	now time.Time
}

func newMemTestClock() *memTestClock {
	return &memTestClock{now: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *memTestClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *memTestClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// memTestKey returns the i-th of a series of distinct keys shaped like the
// middleware's storage keys (64 lowercase hex characters).
func memTestKey(series string, i int) string {
	h := sha256.New()
	h.Write([]byte(series))
	_ = binary.Write(h, binary.BigEndian, int64(i))
	return hex.EncodeToString(h.Sum(nil))
}

// memTestRecord returns a completed record with a small response.
func memTestRecord() *idempotency.Record {
	return &idempotency.Record{
		State:       idempotency.StateCompleted,
		Token:       "t",
		Fingerprint: make([]byte, 32),
		Response: idempotency.Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Content-Type": {"application/json"}},
			Body:       []byte(`{"id":1}`),
		},
	}
}

// memSweepers returns how many memory store sweeper goroutines exist,
// started or about to start.
func memSweepers() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "created by github.com/f8e778d0/idempotency.NewMemoryStore")
		}
		buf = make([]byte, 2*len(buf))
	}
}

func TestMemoryStoreConformance(t *testing.T) {
	t.Run("FakeClock", func(t *testing.T) {
		clock := newMemTestClock()
		store := idempotency.NewMemoryStore(idempotency.WithTestClock(clock.Now))
		storetest.Run(t, func(*testing.T) idempotency.Store { return store },
			storetest.WithAdvance(func(_ *testing.T, d time.Duration) { clock.Advance(d) }))
		assert.Zero(t, store.Len(), "the suite deletes every key it made")
	})

	t.Run("FakeClockWithSweeper", func(t *testing.T) {
		// A sweeper running all the time must not change any outcome.
		clock := newMemTestClock()
		store := idempotency.NewMemoryStore(idempotency.WithTestClock(clock.Now),
			idempotency.WithSweepInterval(time.Millisecond))
		t.Cleanup(func() { assert.NoError(t, store.Close()) })
		storetest.Run(t, func(*testing.T) idempotency.Store { return store },
			storetest.WithAdvance(func(_ *testing.T, d time.Duration) { clock.Advance(d) }))
	})

	t.Run("RealClock", func(t *testing.T) {
		if testing.Short() {
			t.Skip("sleeps for a few seconds; the fake-clock runs cover the same checks")
		}
		store := idempotency.NewMemoryStore()
		storetest.Run(t, func(*testing.T) idempotency.Store { return store })
	})
}

func TestMemoryStoreClaimReturnsStoredRecord(t *testing.T) {
	// Claim and Get hand back the record as it was completed, with the
	// completing token and state, each time in a Record of the caller's.
	ctx := context.Background()
	store := idempotency.NewMemoryStore()
	key := memTestKey("same", 0)
	require.NoError(t, func() error { _, err := store.Claim(ctx, key, "a", time.Minute); return err }())

	rec := memTestRecord()
	rec.State, rec.Token = 0, "" // the store sets them
	want := *memTestRecord()
	want.State, want.Token = idempotency.StateCompleted, "a"
	require.NoError(t, store.Complete(ctx, key, "a", rec, time.Hour))

	got, err := store.Claim(ctx, key, "b", time.Minute)
	require.NoError(t, err)
	assert.Equal(t, &want, got, "Claim returns the record as it was completed")
	got.Response.Header.Set("X-Changed", "by the caller")
	got, err = store.Get(ctx, key)
	require.NoError(t, err)
	assert.Equal(t, &want, got, "so does Get, whatever a caller did to its copy")
}

func TestMemoryStoreAllocations(t *testing.T) {
	ctx := context.Background()
	store := idempotency.NewMemoryStore()
	// Fill the shards a little so that claims do not grow their maps.
	for i := range 1000 {
		_, err := store.Claim(ctx, memTestKey("fill", i), "a", time.Hour)
		require.NoError(t, err)
	}
	keys := make([]string, 200)
	for i := range keys {
		keys[i] = memTestKey("alloc", i)
	}
	rec := memTestRecord()
	i := 0
	allocs := testing.AllocsPerRun(len(keys)-1, func() {
		key := keys[i]
		i++
		_, _ = store.Claim(ctx, key, "a", time.Minute)
		_ = store.Complete(ctx, key, "a", rec, time.Hour)
	})
	assert.LessOrEqual(t, allocs, 1.0, "Claim of an absent key and Complete allocate nothing but map growth")

	allocs = testing.AllocsPerRun(100, func() { _, _ = store.Claim(ctx, keys[0], "b", time.Minute) })
	assert.LessOrEqual(t, allocs, 3.0, "Claim of a completed key: the Record and its header map")

	key := memTestKey("alloc-release", 0)
	allocs = testing.AllocsPerRun(100, func() {
		_, _ = store.Claim(ctx, key, "a", time.Minute)
		_ = store.Release(ctx, key, "a")
	})
	assert.Zero(t, allocs, "Claim and Release of a key allocate nothing")
}

func TestMemoryStoreCap(t *testing.T) {
	ctx := context.Background()
	clock := newMemTestClock()
	store := idempotency.NewMemoryStore(idempotency.WithMaxEntries(3), idempotency.WithTestClock(clock.Now))

	inFlight, completed, released := memTestKey("cap", 0), memTestKey("cap", 1), memTestKey("cap", 2)
	for _, key := range []string{inFlight, completed, released} {
		rec, err := store.Claim(ctx, key, "owner", time.Minute)
		require.NoError(t, err)
		require.Nil(t, rec)
	}
	want := memTestRecord()
	want.Token = "owner"
	require.NoError(t, store.Complete(ctx, completed, "owner", memTestRecord(), time.Hour))
	require.Equal(t, 3, store.Len())

	t.Run("RefusesNewKeys", func(t *testing.T) {
		rec, err := store.Claim(ctx, memTestKey("cap", 3), "other", time.Minute)
		assert.ErrorIs(t, err, idempotency.ErrStoreFull)
		assert.Nil(t, rec)
		assert.Equal(t, 3, store.Len())
	})

	t.Run("ServesExistingKeys", func(t *testing.T) {
		rec, err := store.Claim(ctx, inFlight, "other", time.Minute)
		require.NoError(t, err)
		require.NotNil(t, rec)
		assert.Equal(t, idempotency.StateInFlight, rec.State)

		rec, err = store.Claim(ctx, completed, "other", time.Minute)
		require.NoError(t, err)
		assert.Equal(t, want, rec)

		rec, err = store.Claim(ctx, inFlight, "owner", time.Minute)
		require.NoError(t, err)
		assert.Nil(t, rec, "a re-sent claim by the owner is not a new key")
	})

	t.Run("AcceptsAfterRelease", func(t *testing.T) {
		require.NoError(t, store.Release(ctx, released, "owner"))
		rec, err := store.Claim(ctx, memTestKey("cap", 4), "other", time.Minute)
		require.NoError(t, err)
		assert.Nil(t, rec)
	})

	t.Run("NeverEvictsLiveRecords", func(t *testing.T) {
		for i := range 100 {
			_, err := store.Claim(ctx, memTestKey("flood", i), "flood", time.Minute)
			require.ErrorIs(t, err, idempotency.ErrStoreFull)
			clock.Advance(time.Second / 10) // within every lease
		}
		rec, err := store.Get(ctx, inFlight)
		require.NoError(t, err)
		require.NotNil(t, rec)
		assert.Equal(t, idempotency.StateInFlight, rec.State)
		rec, err = store.Get(ctx, completed)
		require.NoError(t, err)
		assert.Equal(t, want, rec)
	})

	t.Run("AcceptsAfterExpiry", func(t *testing.T) {
		clock.Advance(2 * time.Minute) // past the leases, within the TTL
		rec, err := store.Claim(ctx, memTestKey("cap", 5), "other", time.Minute)
		require.NoError(t, err)
		assert.Nil(t, rec)
		assert.Equal(t, 2, store.Len(), "the expired leases were swept, the completed record kept")
		rec, err = store.Get(ctx, completed)
		require.NoError(t, err)
		assert.Equal(t, want, rec)
	})
}

func TestMemoryStoreCapSweepIsRateLimited(t *testing.T) {
	// At the cap, a claim sweeps the whole store at most once per
	// microsecond of store time per record held, so that a flood of claims
	// at the cap does not cost O(n) each; once that time has passed, the
	// next claim sweeps the expired records and succeeds.
	ctx := context.Background()
	clock := newMemTestClock()
	const n = 5000 // one sweep per 5ms at most
	store := idempotency.NewMemoryStore(idempotency.WithMaxEntries(n), idempotency.WithTestClock(clock.Now))
	for i := range n {
		_, err := store.Claim(ctx, memTestKey("limit", i), "owner", time.Millisecond)
		require.NoError(t, err)
	}
	_, err := store.Claim(ctx, memTestKey("limit-new", 0), "other", time.Minute)
	require.ErrorIs(t, err, idempotency.ErrStoreFull, "swept, nothing had expired")

	clock.Advance(2 * time.Millisecond) // every lease ran out, the last sweep is recent
	for i := range 100 {
		_, err := store.Claim(ctx, memTestKey("limit-new", i), "other", time.Minute)
		require.ErrorIs(t, err, idempotency.ErrStoreFull, "claim %d swept again too soon", i)
	}
	assert.Equal(t, n, store.Len())

	clock.Advance(5 * time.Millisecond)
	rec, err := store.Claim(ctx, memTestKey("limit-new", 0), "other", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, rec)
	assert.Equal(t, 1, store.Len())
}

func TestMemoryStoreReleasedKeysLeaveNothing(t *testing.T) {
	ctx := context.Background()
	store := idempotency.NewMemoryStore()
	const n = 10_000
	for i := range n {
		_, err := store.Claim(ctx, memTestKey("release", i), "owner", time.Minute)
		require.NoError(t, err)
	}
	require.Equal(t, n, store.Len())
	for i := range n {
		require.NoError(t, store.Release(ctx, memTestKey("release", i), "owner"))
	}
	assert.Zero(t, store.Len())

	// Unique keys claimed and released one at a time never pile up.
	for i := range n {
		key := memTestKey("one-by-one", i)
		_, err := store.Claim(ctx, key, "owner", time.Minute)
		require.NoError(t, err)
		require.NoError(t, store.Release(ctx, key, "owner"))
	}
	assert.Zero(t, store.Len())
}

func TestMemoryStoreGivesMemoryBack(t *testing.T) {
	// After a flood of keys is released, the store's maps shrink: the heap
	// returns close to where it was, not to where the flood took it.
	ctx := context.Background()
	store := idempotency.NewMemoryStore()
	const n = 30_000
	before := memHeapAfterGC()
	for i := range n {
		_, err := store.Claim(ctx, memTestKey("flood", i), "owner", time.Minute)
		require.NoError(t, err)
	}
	full := memHeapAfterGC()
	for i := range n {
		require.NoError(t, store.Release(ctx, memTestKey("flood", i), "owner"))
	}
	after := memHeapAfterGC()
	runtime.KeepAlive(store)
	require.Greater(t, full, before)
	grown := full - before
	assert.Less(t, int64(after)-int64(before), int64(grown/10),
		"heap: %d before, %d with %d keys, %d after releasing them", before, full, n, after)
}

func TestMemoryStoreInlineSweep(t *testing.T) {
	// Expired records are removed by later writes, with no goroutine.
	ctx := context.Background()
	clock := newMemTestClock()
	goroutines := runtime.NumGoroutine()
	store := idempotency.NewMemoryStore(idempotency.WithTestClock(clock.Now))
	assert.LessOrEqual(t, runtime.NumGoroutine(), goroutines, "NewMemoryStore starts no goroutine")
	assert.Zero(t, memSweepers())

	const n = 10_000
	for i := range n {
		key := memTestKey("expire", i)
		_, err := store.Claim(ctx, key, "owner", time.Second)
		require.NoError(t, err)
		if i%2 == 0 {
			require.NoError(t, store.Complete(ctx, key, "owner", memTestRecord(), time.Second))
		}
	}
	require.Equal(t, n, store.Len())
	clock.Advance(2 * time.Second)

	// Each write examines a few records; keep writing until all expired
	// records are gone, with a generous bound on how many writes it takes.
	writes := 0
	for store.Len() > 0 && writes < 4*n {
		key := memTestKey("churn", writes)
		_, err := store.Claim(ctx, key, "owner", time.Minute)
		require.NoError(t, err)
		require.NoError(t, store.Release(ctx, key, "owner"))
		writes++
	}
	assert.Zero(t, store.Len(), "expired records left after %d writes", writes)
	assert.LessOrEqual(t, runtime.NumGoroutine(), goroutines, "no goroutine was started")
	assert.Zero(t, memSweepers())
}

func TestMemoryStoreSweeper(t *testing.T) {
	clock := newMemTestClock()
	sweepers := memSweepers()
	store := idempotency.NewMemoryStore(idempotency.WithTestClock(clock.Now),
		idempotency.WithSweepInterval(time.Millisecond))
	assert.Equal(t, sweepers+1, memSweepers(), "WithSweepInterval starts one goroutine")

	ctx := context.Background()
	for i := range 1000 {
		_, err := store.Claim(ctx, memTestKey("sweeper", i), "owner", time.Second)
		require.NoError(t, err)
	}
	clock.Advance(2 * time.Second)
	// No writes: only the sweeper can remove the expired records.
	assert.Eventually(t, func() bool { return store.Len() == 0 }, 10*time.Second, time.Millisecond)

	require.NoError(t, store.Close())
	assert.Equal(t, sweepers, memSweepers(), "Close waits for the sweeper to exit")
	require.NoError(t, store.Close(), "Close is idempotent")

	// The store still works after Close, without the sweeper.
	rec, err := store.Claim(ctx, memTestKey("after-close", 0), "owner", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, rec)
}

func TestMemoryStoreCloseWithoutSweeper(t *testing.T) {
	store := idempotency.NewMemoryStore()
	assert.NoError(t, store.Close())
	assert.NoError(t, store.Close())
}

func TestMemoryStoreConcurrentClose(t *testing.T) {
	sweepers := memSweepers()
	store := idempotency.NewMemoryStore(idempotency.WithSweepInterval(time.Millisecond))
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { assert.NoError(t, store.Close()) })
	}
	wg.Wait()
	assert.Equal(t, sweepers, memSweepers(), "every Close returned after the sweeper exited")
}

func TestMemoryStoreOptionsPanic(t *testing.T) {
	tests := []struct {
		name string
		make func()
	}{
		{"ZeroMaxEntries", func() { idempotency.WithMaxEntries(0) }},
		{"NegativeMaxEntries", func() { idempotency.WithMaxEntries(-1) }},
		{"NegativeSweepInterval", func() { idempotency.WithSweepInterval(-time.Second) }},
		{"NilClock", func() { idempotency.WithTestClock(nil) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				r := recover()
				require.NotNil(t, r, "no panic")
				assert.Contains(t, fmt.Sprint(r), "idempotency: ")
			}()
			tt.make()
		})
	}
}

func TestMemoryStoreExpiryCheckedOnRead(t *testing.T) {
	// With no sweeper and no writes, an expired record is never returned.
	ctx := context.Background()
	clock := newMemTestClock()
	store := idempotency.NewMemoryStore(idempotency.WithTestClock(clock.Now))
	key := memTestKey("read", 0)
	_, err := store.Claim(ctx, key, "owner", time.Minute)
	require.NoError(t, err)
	require.NoError(t, store.Complete(ctx, key, "owner", memTestRecord(), time.Hour))

	clock.Advance(time.Hour - time.Nanosecond)
	rec, err := store.Get(ctx, key)
	require.NoError(t, err)
	require.NotNil(t, rec, "still live one nanosecond before its TTL")

	clock.Advance(time.Nanosecond)
	rec, err = store.Get(ctx, key)
	require.NoError(t, err)
	assert.Nil(t, rec, "expired exactly at its TTL")
	rec, err = store.Claim(ctx, key, "next", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, rec)
	assert.Equal(t, 1, store.Len(), "the claim reused the expired record's place")
}

func TestMemoryStoreHugeTTL(t *testing.T) {
	// A TTL that would overflow the store's clock saturates instead of
	// wrapping into the past.
	ctx := context.Background()
	store := idempotency.NewMemoryStore()
	key := memTestKey("huge", 0)
	_, err := store.Claim(ctx, key, "owner", time.Duration(1<<63-1))
	require.NoError(t, err)
	rec, err := store.Claim(ctx, key, "other", time.Minute)
	require.NoError(t, err)
	require.NotNil(t, rec)
	assert.Equal(t, idempotency.StateInFlight, rec.State)
}

func TestMemoryStoreParallelUniqueKeys(t *testing.T) {
	// Many goroutines running the whole lifecycle on their own keys, with
	// some keys shared between them, under -race.
	ctx := context.Background()
	store := idempotency.NewMemoryStore(idempotency.WithMaxEntries(1 << 20))
	const workers, perWorker = 8, 2000
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			token := fmt.Sprintf("worker-%d", w)
			for i := range perWorker {
				key := memTestKey(token, i)
				if i%10 == 0 {
					key = memTestKey("shared", i)
				}
				rec, err := store.Claim(ctx, key, token, time.Minute)
				if !assert.NoError(t, err) {
					return
				}
				if rec != nil {
					continue // another worker holds the shared key
				}
				if i%3 == 0 {
					assert.NoError(t, store.Release(ctx, key, token))
				} else {
					assert.NoError(t, store.Complete(ctx, key, token, memTestRecord(), time.Hour))
				}
			}
		})
	}
	wg.Wait()
	assert.Positive(t, store.Len())
	assert.LessOrEqual(t, store.Len(), workers*perWorker)
}

func TestMemoryStoreKeysDoNotCollide(t *testing.T) {
	// The store indexes a key of 64 lowercase hex characters by the bytes
	// it decodes to and any other key by its SHA-256. No two different
	// keys may meet, however each is indexed: otherwise a request would be
	// answered with another key's record.
	lower := memTestKey("collide", 0)
	raw, err := hex.DecodeString(lower)
	require.NoError(t, err)
	plainSum := sha256.Sum256([]byte("plain"))
	long := strings.Repeat("k", 300)
	letter := strings.IndexAny(lower, "abcdef")
	require.GreaterOrEqual(t, letter, 0)
	keys := []string{
		lower,
		strings.ToUpper(lower), // the same bytes in upper case
		lower[:letter] + strings.ToUpper(lower[letter:letter+1]) + lower[letter+1:],
		"plain",
		hex.EncodeToString(plainSum[:]), // the hex of the SHA-256 of "plain"
		string(raw),                     // the 32 bytes lower decodes to
		lower[:63],
		lower + "0",
		lower[:63] + "g",
		"",
		long[:128],
		long[:256], // hashed from a copy on the stack
		long[:257], // hashed from the string itself
		long,
	}
	seen := map[string]bool{}
	for _, key := range keys {
		require.False(t, seen[key], "the test keys are distinct: %q", key)
		seen[key] = true
	}

	ctx := context.Background()
	store := idempotency.NewMemoryStore()
	token := func(i int) string { return fmt.Sprintf("owner-%d", i) }
	for i, key := range keys {
		rec, err := store.Claim(ctx, key, token(i), time.Minute)
		require.NoError(t, err)
		require.Nil(t, rec, "key %d (%q) found another key's record", i, key)
	}
	require.Equal(t, len(keys), store.Len())
	for i, key := range keys {
		if i%2 == 0 {
			require.NoError(t, store.Complete(ctx, key, token(i), memTestRecord(), time.Hour), "key %d", i)
		}
	}
	check := func(from int) {
		t.Helper()
		for i := from; i < len(keys); i++ {
			rec, err := store.Get(ctx, keys[i])
			require.NoError(t, err)
			require.NotNil(t, rec, "key %d (%q)", i, keys[i])
			assert.Equal(t, token(i), rec.Token, "key %d (%q)", i, keys[i])
			want := idempotency.StateInFlight
			if i%2 == 0 {
				want = idempotency.StateCompleted
			}
			assert.Equal(t, want, rec.State, "key %d (%q)", i, keys[i])
		}
	}
	check(0)
	// Removing each key in turn leaves every other one where it was.
	for i, key := range keys {
		require.NoError(t, store.Delete(ctx, key))
		rec, err := store.Get(ctx, key)
		require.NoError(t, err)
		assert.Nil(t, rec, "key %d after Delete", i)
		check(i + 1)
	}
	assert.Zero(t, store.Len())
}

func TestMemoryStoreShrinksAfterPeak(t *testing.T) {
	// A store that held many records and then few gives memory back in
	// two steps: each shard that falls to an eighth of its peak is rebuilt
	// around the records it keeps, which go on being served as before,
	// and a shard that empties keeps nothing.
	ctx := context.Background()
	store := idempotency.NewMemoryStore()
	const n, keep = 40_000, 20 // keep one key in keep
	before := memHeapAfterGC()
	for i := range n {
		key := memTestKey("peak", i)
		_, err := store.Claim(ctx, key, fmt.Sprint(i), time.Hour)
		require.NoError(t, err)
		if i%2 == 0 {
			require.NoError(t, store.Complete(ctx, key, fmt.Sprint(i), memTestRecord(), time.Hour))
		}
	}
	full := memHeapAfterGC()
	for i := range n {
		if i%keep != 0 {
			require.NoError(t, store.Delete(ctx, memTestKey("peak", i)))
		}
	}
	few := memHeapAfterGC()
	require.Equal(t, n/keep, store.Len())
	for i := 0; i < n; i += keep {
		rec, err := store.Get(ctx, memTestKey("peak", i))
		require.NoError(t, err)
		require.NotNil(t, rec, "key %d kept through the rebuild", i)
		assert.Equal(t, fmt.Sprint(i), rec.Token)
		assert.Equal(t, idempotency.StateCompleted, rec.State)
		require.ErrorIs(t, store.Release(ctx, memTestKey("peak", i), "other"), idempotency.ErrNotOwner)
		rec, err = store.Get(ctx, memTestKey("peak", i+1))
		require.NoError(t, err)
		require.Nil(t, rec, "key %d deleted", i+1)
	}
	for i := 0; i < n; i += keep {
		require.NoError(t, store.Delete(ctx, memTestKey("peak", i)))
	}
	empty := memHeapAfterGC()
	runtime.KeepAlive(store)
	t.Logf("heap over the empty store: %d with %d records, %d with %d, %d with none",
		full-before, n, int64(few)-int64(before), n/keep, int64(empty)-int64(before))
	grown := int64(full - before)
	assert.Less(t, int64(few)-int64(before), grown/5, "rebuilt shards hold about their records, not their peak")
	assert.Less(t, int64(empty)-int64(before), grown/50, "emptied shards hold nothing")
}

func BenchmarkMemoryStore(b *testing.B) {
	ctx := context.Background()
	rec := memTestRecord()
	b.Run("ClaimCompleteUnique", func(b *testing.B) {
		store := idempotency.NewMemoryStore()
		keys := make([]string, 1<<16)
		for i := range keys {
			keys[i] = memTestKey("bench", i)
		}
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				key := keys[i&(len(keys)-1)]
				i++
				if r, _ := store.Claim(ctx, key, "t", time.Minute); r == nil {
					_ = store.Complete(ctx, key, "t", rec, time.Millisecond)
				}
			}
		})
	})
	b.Run("ClaimReleaseParallel", func(b *testing.B) {
		store := idempotency.NewMemoryStore()
		b.ReportAllocs()
		var next sync.Mutex
		worker := 0
		b.RunParallel(func(pb *testing.PB) {
			next.Lock()
			worker++
			key := memTestKey("bench-release", worker)
			next.Unlock()
			for pb.Next() {
				_, _ = store.Claim(ctx, key, "t", time.Minute)
				_ = store.Release(ctx, key, "t")
			}
		})
	})
	b.Run("ClaimCompletedParallel", func(b *testing.B) {
		store := idempotency.NewMemoryStore()
		key := memTestKey("bench-replay", 0)
		_, _ = store.Claim(ctx, key, "t", time.Minute)
		_ = store.Complete(ctx, key, "t", rec, time.Hour)
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				_, _ = store.Claim(ctx, key, "u", time.Minute)
			}
		})
	})
}

// memHeapAfterGC returns the bytes of live heap after a collection.
func memHeapAfterGC() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}
