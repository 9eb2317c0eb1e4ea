package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// memPointerWords returns how many words of a value of type t the garbage
// collector has to read as pointers.
func memPointerWords(t reflect.Type) int {
	switch t.Kind() {
	case reflect.String, reflect.Slice, reflect.Pointer, reflect.UnsafePointer,
		reflect.Map, reflect.Chan, reflect.Func:
		return 1
	case reflect.Interface:
		return 2
	case reflect.Array:
		return t.Len() * memPointerWords(t.Elem())
	case reflect.Struct:
		n := 0
		for i := range t.NumField() {
			n += memPointerWords(t.Field(i).Type)
		}
		return n
	}
	return 0
}

func TestMemoryStoreLayout(t *testing.T) {
	// The keys of a shard's map hold no pointer, so the collector never
	// scans them.
	records := reflect.TypeOf(memShard{}.records)
	assert.Zero(t, memPointerWords(records.Key()), "map keys hold no pointer")
	assert.Equal(t, reflect.TypeFor[memKey](), records.Key())
}

// memHashed is the memKey of a key that is not a storage key.
func memHashed(key string) memKey { return memKey{sum: sha256.Sum256([]byte(key)), hashed: true} }

// memDecoded is the memKey of a storage key.
func memDecoded(t testing.TB, key string) memKey {
	b, err := hex.DecodeString(key)
	require.NoError(t, err)
	var k memKey
	require.Equal(t, len(k.sum), copy(k.sum[:], b))
	return k
}

func TestMemKeyOf(t *testing.T) {
	lower := StorageKey("scope", "key")
	tests := []struct {
		name string
		key  string
		want memKey
	}{
		{"StorageKey", lower, memDecoded(t, lower)},
		{"UpperCase", strings.ToUpper(lower), memHashed(strings.ToUpper(lower))},
		{"NotHex", strings.Repeat("g", 64), memHashed(strings.Repeat("g", 64))},
		{"Short", lower[:62], memHashed(lower[:62])},
		{"Long", lower + "00", memHashed(lower + "00")},
		{"Empty", "", memHashed("")},
		{"Arbitrary", "a key of a caller's own", memHashed("a key of a caller's own")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, memKeyOf(tt.key))
		})
	}
	// Every byte value at every position: the key is decoded exactly when
	// all its characters are lowercase hex digits, and hashed otherwise.
	for p := range len(lower) {
		for c := range 256 {
			key := lower[:p] + string([]byte{byte(c)}) + lower[p+1:]
			if strings.IndexByte("0123456789abcdef", byte(c)) < 0 {
				require.Equal(t, memHashed(key), memKeyOf(key), "byte %#x at %d", c, p)
			} else {
				require.Equal(t, memDecoded(t, key), memKeyOf(key), "digit %q at %d", c, p)
			}
		}
	}
}

func FuzzMemoryKey(f *testing.F) {
	// memKeyOf against its definition: decoded when the key is 64
	// lowercase hex digits, hashed otherwise.
	lower := StorageKey("scope", "key")
	for _, seed := range []string{lower, strings.ToUpper(lower), lower[:63] + "\xff", "", "plain"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, key string) {
		want := memHashed(key)
		if len(key) == 64 && strings.Trim(key, "0123456789abcdef") == "" {
			want = memDecoded(t, key)
		}
		require.Equal(t, want, memKeyOf(key))
	})
}

// memTestNow is a clock that tests move by hand.
type memTestNow struct {
	mu  sync.Mutex
	now time.Time
}

func (c *memTestNow) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *memTestNow) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// newMemTestStore returns a store on a clock that moves by hand.
func newMemTestStore(opts ...MemoryOption) (*MemoryStore, *memTestNow) {
	clock := &memTestNow{now: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
	return NewMemoryStore(append([]MemoryOption{WithTestClock(clock.Now)}, opts...)...), clock
}

// memLayoutKey returns the i-th of a series of keys of the middleware's
// shape.
func memLayoutKey(i int) string { return StorageKey("layout", fmt.Sprint(i)) }

// memSmallRecord returns a completed record with a small response.
func memSmallRecord() *Record {
	return &Record{
		Fingerprint: make([]byte, 32),
		Response: Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Content-Type": {"application/json"}, "Location": {"/orders/1"}},
			Body:       []byte(`{"id":1}`),
		},
	}
}

// memCheckShards checks the bookkeeping of s: every record sits in the
// shard of its key, the entry count and the byte count are the sums of
// what the records are charged, and only in-flight claims have watchers.
func memCheckShards(t *testing.T, s *MemoryStore) {
	t.Helper()
	var entries, bytes int64
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for k, e := range sh.records {
			require.Same(t, sh, s.shard(&k), "shard %d holds a key of another shard", i)
			if e.completed() {
				require.Nil(t, e.watch, "shard %d: a completed record with a watcher", i)
				require.Empty(t, e.token)
				require.Equal(t, memRecordSize(e.record()), e.size, "shard %d: a completed record's charge", i)
			} else {
				require.Equal(t, memClaimSize(e.token), e.size, "shard %d: a claim's charge", i)
			}
			entries++
			bytes += e.size
		}
		require.LessOrEqual(t, len(sh.records), max(sh.peak, 0))
		sh.mu.Unlock()
	}
	require.Equal(t, entries, s.entries.Load(), "entries")
	require.Equal(t, bytes, s.bytes.Load(), "bytes")
}

func TestMemoryStoreChurn(t *testing.T) {
	// Random claims, take-overs of expired claims, completions, releases,
	// deletes, watchers and time passing over a few thousand keys keep the
	// bookkeeping straight; deleting every key brings it back to zero.
	ctx := context.Background()
	store, clock := newMemTestStore(WithMaxBytes(4 << 20))
	rng := rand.New(rand.NewPCG(5, 6))
	const keys = 5000
	var claimed, completed, full int
	for step := range 200_000 {
		key := memLayoutKey(rng.IntN(keys))
		token := "t" + key[:4]
		switch rng.IntN(7) {
		case 0, 1:
			rec, err := store.Claim(ctx, key, token, time.Duration(1+rng.IntN(5))*time.Second)
			if errors.Is(err, ErrStoreFull) {
				full++
				break
			}
			require.NoError(t, err)
			if rec == nil {
				claimed++
			}
		case 2:
			require.NoError(t, store.Delete(ctx, key))
		case 3:
			if err := store.Release(ctx, key, token); err != nil {
				require.ErrorIs(t, err, ErrNotOwner)
			}
		case 4:
			rec := memSmallRecord()
			rec.Response.Body = make([]byte, rng.IntN(4096))
			switch err := store.Complete(ctx, key, token, rec, time.Second); {
			case err == nil:
				completed++
			case errors.Is(err, ErrStoreFull):
				completed++
			default:
				require.ErrorIs(t, err, ErrNotOwner)
			}
		case 5:
			_ = store.watch(key)
		case 6:
			clock.Advance(time.Duration(rng.IntN(300)) * time.Millisecond)
		}
		if step%20_000 == 0 {
			memCheckShards(t, store)
			require.LessOrEqual(t, store.bytes.Load(), store.maxBytes)
		}
	}
	memCheckShards(t, store)
	t.Logf("%d claims, %d completions, %d claims refused as full", claimed, completed, full)
	assert.Greater(t, claimed, 10_000)
	assert.Greater(t, completed, 100)
	for i := range keys {
		require.NoError(t, store.Delete(ctx, memLayoutKey(i)))
	}
	memCheckShards(t, store)
	assert.Zero(t, store.Len())
	assert.Zero(t, store.bytes.Load())
}

func TestMemoryStoreWatch(t *testing.T) {
	// A watcher is woken when the claim it watches ends (completed,
	// released, deleted, swept or taken over) and only then, for keys of
	// the middleware's shape and for any other key alike.
	ctx := context.Background()
	type env struct {
		store *MemoryStore
		clock *memTestNow
		key   string
	}
	tests := []struct {
		name  string
		sweep bool // run a background sweeper
		act   func(t *testing.T, e env)
		wakes bool
	}{
		{"Complete", false, func(t *testing.T, e env) {
			require.NoError(t, e.store.Complete(ctx, e.key, "owner", memSmallRecord(), time.Hour))
		}, true},
		{"CompleteOverBudget", false, func(t *testing.T, e env) {
			rec := memSmallRecord()
			rec.Response.Body = make([]byte, 1<<20)
			require.ErrorIs(t, e.store.Complete(ctx, e.key, "owner", rec, time.Hour), ErrStoreFull)
		}, true},
		{"Release", false, func(t *testing.T, e env) {
			require.NoError(t, e.store.Release(ctx, e.key, "owner"))
		}, true},
		{"Delete", false, func(t *testing.T, e env) {
			require.NoError(t, e.store.Delete(ctx, e.key))
		}, true},
		{"Takeover", false, func(t *testing.T, e env) {
			e.clock.Advance(2 * time.Minute)
			rec, err := e.store.Claim(ctx, e.key, "next", time.Minute)
			require.NoError(t, err)
			require.Nil(t, rec)
		}, true},
		{"Swept", true, func(t *testing.T, e env) {
			e.clock.Advance(2 * time.Minute)
			require.Eventually(t, func() bool { return e.store.Len() == 0 }, 10*time.Second, time.Millisecond)
		}, true},
		{"ClaimResentByOwner", false, func(t *testing.T, e env) {
			rec, err := e.store.Claim(ctx, e.key, "owner", time.Minute)
			require.NoError(t, err)
			require.Nil(t, rec)
		}, false},
		{"ExpiredClaimRetakenByOwner", false, func(t *testing.T, e env) {
			e.clock.Advance(2 * time.Minute)
			rec, err := e.store.Claim(ctx, e.key, "owner", time.Minute)
			require.NoError(t, err)
			require.Nil(t, rec)
		}, false},
		{"ClaimByAnother", false, func(t *testing.T, e env) {
			rec, err := e.store.Claim(ctx, e.key, "other", time.Minute)
			require.NoError(t, err)
			require.NotNil(t, rec)
		}, false},
		{"Extend", false, func(t *testing.T, e env) {
			require.NoError(t, e.store.Extend(ctx, e.key, "owner", time.Hour))
		}, false},
		{"RefusedByNonOwner", false, func(t *testing.T, e env) {
			require.ErrorIs(t, e.store.Complete(ctx, e.key, "other", memSmallRecord(), time.Hour), ErrNotOwner)
			require.ErrorIs(t, e.store.Release(ctx, e.key, "other"), ErrNotOwner)
		}, false},
		{"LeaseRunsOut", false, func(_ *testing.T, e env) {
			e.clock.Advance(2 * time.Minute)
		}, false},
		{"OtherKeysEnd", false, func(t *testing.T, e env) {
			for i := range 500 {
				key := memLayoutKey(i)
				_, err := e.store.Claim(ctx, key, "owner", time.Minute)
				require.NoError(t, err)
				if i%2 == 0 {
					require.NoError(t, e.store.Release(ctx, key, "owner"))
				} else {
					require.NoError(t, e.store.Complete(ctx, key, "owner", memSmallRecord(), time.Hour))
				}
			}
		}, false},
	}
	for _, kind := range []struct{ name, key string }{
		{"StorageKey", StorageKey("", "watch")},
		{"OtherKey", "a key of a caller's own"},
	} {
		for _, tt := range tests {
			t.Run(kind.name+"/"+tt.name, func(t *testing.T) {
				opts := []MemoryOption{WithMaxBytes(1 << 20)}
				if tt.sweep {
					opts = append(opts, WithSweepInterval(time.Millisecond))
				}
				store, clock := newMemTestStore(opts...)
				t.Cleanup(func() { assert.NoError(t, store.Close()) })
				assert.Nil(t, store.watch(kind.key), "absent key")
				_, err := store.Claim(ctx, kind.key, "owner", time.Minute)
				require.NoError(t, err)
				ch := store.watch(kind.key)
				require.NotNil(t, ch)
				assert.Equal(t, ch, store.watch(kind.key), "watchers of a claim share one channel")

				tt.act(t, env{store, clock, kind.key})
				select {
				case <-ch:
					assert.True(t, tt.wakes, "woken though the claim goes on")
				default:
					assert.False(t, tt.wakes, "not woken though the claim ended")
				}
				memCheckShards(t, store)
				if tt.wakes {
					if rec, _ := store.Get(ctx, kind.key); rec == nil || rec.State == StateCompleted {
						assert.Nil(t, store.watch(kind.key), "no claim to watch")
					}
				}
			})
		}
	}
}

func TestMemoryStoreWatchersAreSeparate(t *testing.T) {
	// Several keys watched at once, many of them in the same shard: each
	// end wakes the watchers of its own key only, and leaves nothing.
	ctx := context.Background()
	store := NewMemoryStore()
	const n = 300
	chans := make([]<-chan struct{}, n)
	for i := range n {
		key := memLayoutKey(i)
		_, err := store.Claim(ctx, key, "owner", time.Minute)
		require.NoError(t, err)
		chans[i] = store.watch(key)
		require.NotNil(t, chans[i])
	}
	for i := range n {
		require.NoError(t, store.Release(ctx, memLayoutKey(i), "owner"))
		for j, ch := range chans {
			select {
			case <-ch:
				require.LessOrEqual(t, j, i, "the watcher of key %d woke when key %d was released", j, i)
			default:
				require.Greater(t, j, i, "the watcher of key %d slept through its release", j)
			}
		}
	}
	memCheckShards(t, store)
	assert.Zero(t, store.Len())
	assert.Zero(t, store.bytes.Load())
}

func TestMemoryStoreInlineSweepIsAmortised(t *testing.T) {
	// A shard is swept once its writes since the last sweep reach half its
	// records (and at least memSweepMin): expired records never pile up
	// past that, whatever the traffic.
	ctx := context.Background()
	store, clock := newMemTestStore()
	const n = 20_000
	for i := range n {
		_, err := store.Claim(ctx, memLayoutKey(i), "t", time.Second)
		require.NoError(t, err)
	}
	clock.Advance(2 * time.Second)
	writes := 0
	for store.Len() > 0 {
		key := StorageKey("churn", fmt.Sprint(writes))
		_, err := store.Claim(ctx, key, "t", time.Minute)
		require.NoError(t, err)
		require.NoError(t, store.Release(ctx, key, "t"))
		writes++
		require.Less(t, writes, n, "expired records left")
	}
	t.Logf("%d expired records swept in %d claims and releases", n, writes)
	memCheckShards(t, store)
}
