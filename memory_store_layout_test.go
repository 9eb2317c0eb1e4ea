package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"
	"unsafe"

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
	// What a record held costs the collector: the index is never scanned
	// (its slots hold no pointer) and a record's entry holds one pointer.
	assert.Zero(t, memPointerWords(reflect.TypeOf(memIndex{}.slots).Elem()), "index slots hold no pointer")
	assert.Equal(t, 1, memPointerWords(reflect.TypeFor[memIndex]()), "the index is one slice")
	assert.Equal(t, 1, memPointerWords(reflect.TypeFor[memEntry]()), "an entry holds one pointer")

	if unsafe.Sizeof(uintptr(0)) != 8 {
		t.Skip("the sizes below are those of 64-bit platforms")
	}
	assert.EqualValues(t, 56, unsafe.Sizeof(memEntry{}), "an entry takes 56 bytes")
	assert.EqualValues(t, 128, unsafe.Sizeof(memShard{}), "a shard fills two cache lines")
}

func TestMemKeyOf(t *testing.T) {
	lower := StorageKey("scope", "key")
	decoded, err := hex.DecodeString(lower)
	require.NoError(t, err)
	hashed := func(key string) memKey {
		sum := sha256.Sum256([]byte(key))
		return memKey(append([]byte{memKeyHashed}, sum[:]...))
	}
	tests := []struct {
		name string
		key  string
		want memKey
	}{
		{"StorageKey", lower, memKey(append([]byte{memKeyHex}, decoded...))},
		{"UpperCase", strings.ToUpper(lower), hashed(strings.ToUpper(lower))},
		{"NotHex", strings.Repeat("g", 64), hashed(strings.Repeat("g", 64))},
		{"Short", lower[:62], hashed(lower[:62])},
		{"Long", lower + "00", hashed(lower + "00")},
		{"Empty", "", hashed("")},
		{"BeyondStackCopy", strings.Repeat("x", 1000), hashed(strings.Repeat("x", 1000))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, memKeyOf(tt.key))
		})
	}
	// Every byte value at every position: the key is decoded exactly when
	// all its characters are lowercase hex digits, and then as encoding/hex
	// decodes it; otherwise it is hashed.
	for p := range len(lower) {
		for c := range 256 {
			key := lower[:p] + string([]byte{byte(c)}) + lower[p+1:]
			k := memKeyOf(key)
			if strings.IndexByte("0123456789abcdef", byte(c)) < 0 {
				require.Equal(t, hashed(key), k, "byte %#x at %d", c, p)
				continue
			}
			want, err := hex.DecodeString(key)
			require.NoError(t, err)
			require.Equal(t, memKey(append([]byte{memKeyHex}, want...)), k, "digit %q at %d", c, p)
		}
	}
}

func FuzzMemKeyOf(f *testing.F) {
	// memKeyOf against the plain definition: decoded when the key is 64
	// lowercase hex digits, hashed otherwise. The seeds include bytes from
	// 0x80 up, whose sums carry into the next byte in the decoder.
	lower := StorageKey("scope", "key")
	f.Add(lower)
	f.Add(strings.ToUpper(lower))
	f.Add(lower[:63] + "\xff")
	f.Add("\xff" + lower[1:])
	f.Add(strings.Repeat("\xb0/", 32))
	f.Add("")
	f.Fuzz(func(t *testing.T, key string) {
		want := memKey{memKeyHashed}
		sum := sha256.Sum256([]byte(key))
		copy(want[1:], sum[:])
		if len(key) == 64 && strings.Trim(key, "0123456789abcdef") == "" {
			b, err := hex.DecodeString(key)
			require.NoError(t, err)
			want = memKey{memKeyHex}
			copy(want[1:], b)
		}
		require.Equal(t, want, memKeyOf(key))
	})
}

func TestMemoryStoreEncoded(t *testing.T) {
	// The middleware's path: claimEncoded and completeEncoded keep and hand
	// back the encoding itself, one allocation per completed record.
	ctx := context.Background()
	store := NewMemoryStore()
	rec := &Record{
		Fingerprint: []byte("fp"),
		Response: Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Content-Type": {"application/json"}},
			Body:       []byte(`{"id":1}`),
		},
	}
	enc := encodeRecord("a", rec)

	key := memLayoutKey(1)
	got, genc, err := store.claimEncoded(ctx, key, "a", time.Minute)
	require.NoError(t, err)
	require.Nil(t, got)
	require.Empty(t, genc)
	buf := []byte(enc)
	require.NoError(t, store.completeEncoded(ctx, key, "a", buf, time.Hour))
	clear(buf) // the caller may reuse its buffer
	got, genc, err = store.claimEncoded(ctx, key, "b", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, got)
	assert.Equal(t, enc, genc, "the encoding comes back as it was stored")

	assert.NoError(t, store.completeEncoded(ctx, key, "a", []byte(enc), time.Hour), "re-sent by the token that completed")
	assert.ErrorIs(t, store.completeEncoded(ctx, key, "b", []byte(encodeRecord("b", rec)), time.Hour),
		ErrNotOwner, "by another token")
	assert.ErrorIs(t, store.Complete(ctx, key, "b", rec, time.Hour), ErrNotOwner, "by another token")
	assert.NoError(t, store.Complete(ctx, key, "a", rec, time.Hour), "re-sent by the token that completed")

	full, err := store.Get(ctx, key)
	require.NoError(t, err)
	want := *rec
	want.State, want.Token = StateCompleted, "a"
	assert.Equal(t, &want, full)

	t.Run("TokenNotInEncoding", func(t *testing.T) {
		key := memLayoutKey(2)
		_, _, err := store.claimEncoded(ctx, key, "b", time.Minute)
		require.NoError(t, err)
		assert.PanicsWithValue(t, "idempotency: completeEncoded needs a record encoded for its token", func() {
			_ = store.completeEncoded(ctx, key, "b", []byte(enc), time.Hour)
		})
		assert.Panics(t, func() { _ = store.completeEncoded(ctx, key, "b", nil, time.Hour) })
		r, err := store.Get(ctx, key)
		require.NoError(t, err)
		assert.Equal(t, StateInFlight, r.State, "nothing was stored")
	})

	t.Run("Allocations", func(t *testing.T) {
		store := NewMemoryStore()
		for i := range 1000 {
			_, _, err := store.claimEncoded(ctx, memLayoutKey(1000+i), "t", time.Hour)
			require.NoError(t, err)
		}
		encT := []byte(encodeRecord("t", rec))
		keys := make([]string, 201)
		for i := range keys {
			keys[i] = memLayoutKey(5000 + i)
		}
		i := 0
		allocs := testing.AllocsPerRun(len(keys)-1, func() {
			_, _, _ = store.claimEncoded(ctx, keys[i], "t", time.Minute)
			_ = store.completeEncoded(ctx, keys[i], "t", encT, time.Hour)
			i++
		})
		assert.LessOrEqual(t, allocs, 1.0, "the stored encoding, and map growth")
		allocs = testing.AllocsPerRun(100, func() {
			_, _, _ = store.claimEncoded(ctx, keys[0], "u", time.Minute)
		})
		assert.Zero(t, allocs, "a completed record comes back as its encoding")
	})
}

// memLayoutKey returns the i-th of a series of keys of the middleware's
// shape.
func memLayoutKey(i int) string { return StorageKey("layout", fmt.Sprint(i)) }

// memCheckShards checks the bookkeeping of every shard of s: each record
// is indexed at its position, nothing else is indexed, the count is the
// number of records, and no watcher is left for a claim that ended.
func memCheckShards(t *testing.T, s *MemoryStore) {
	t.Helper()
	total := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		used := 0
		for _, slot := range sh.index.slots {
			if slot != 0 {
				used++
			}
		}
		require.Equal(t, len(sh.entries), used, "shard %d: a slot per record", i)
		require.LessOrEqual(t, 4*used, memIndexMaxLoad*len(sh.index.slots), "shard %d: index load", i)
		require.Len(t, sh.expires, len(sh.entries), "shard %d: an expiry per record", i)
		for j := range sh.entries {
			e := &sh.entries[j]
			at, _ := sh.index.find(&e.key, e.frag, sh.entries)
			require.Equal(t, j, at, "shard %d, entry %d", i, j)
			home, frag := s.shard(&e.key)
			require.Same(t, sh, home, "entry %d of shard %d belongs there", j, i)
			require.Equal(t, frag, e.frag, "shard %d, entry %d: its key's fragment", i, j)
		}
		for k := range sh.watchers {
			_, frag := s.shard(&k)
			at, _ := sh.index.find(&k, frag, sh.entries)
			require.True(t, at >= 0 && !sh.entries[at].done, "shard %d watches a key not in flight", i)
		}
		require.LessOrEqual(t, len(sh.entries), sh.peak)
		total += len(sh.entries)
		sh.mu.Unlock()
	}
	require.Equal(t, total, s.Len())
}

func TestMemoryStoreBookkeeping(t *testing.T) {
	// Every way a record comes and goes keeps each shard's index, positions
	// and watchers straight: growth, rebuilds after a peak, emptying, the
	// inline sweep and watchers that end.
	ctx := context.Background()
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	store := NewMemoryStore(WithClock(func() time.Time { return now }))
	const n = 30_000
	for i := range n {
		key := memLayoutKey(i)
		_, err := store.Claim(ctx, key, "t", time.Duration(1+i%3)*time.Minute)
		require.NoError(t, err)
		switch i % 4 {
		case 0:
			require.NoError(t, store.Complete(ctx, key, "t", &Record{Response: Response{StatusCode: 200}}, time.Hour))
		case 1:
			require.NotNil(t, store.watch(key))
		}
	}
	memCheckShards(t, store)

	// Keep a tenth: about every shard falls below an eighth of its peak
	// and is rebuilt.
	for i := range n {
		if i%10 != 0 {
			require.NoError(t, store.Delete(ctx, memLayoutKey(i)))
		}
	}
	memCheckShards(t, store)
	rebuilt := 0
	for i := range store.shards {
		sh := &store.shards[i]
		assert.True(t, sh.peak < memShrinkMin || len(sh.entries) > sh.peak/8,
			"shard %d holds %d records after a peak of %d", i, len(sh.entries), sh.peak)
		if sh.peak < memShrinkMin {
			rebuilt++
		}
	}
	assert.Greater(t, rebuilt, memShardCount/2, "shards rebuilt")
	for i := 0; i < n; i += 10 {
		r, err := store.Get(ctx, memLayoutKey(i))
		require.NoError(t, err)
		require.NotNil(t, r, "key %d", i)
	}

	// Let the leases run out and write until the inline sweep has removed
	// them; the completed records (every 20th key) stay.
	now = now.Add(5 * time.Minute)
	for i := 0; store.Len() > n/20 && i < 10*n; i++ {
		key := StorageKey("churn", fmt.Sprint(i))
		_, err := store.Claim(ctx, key, "t", time.Minute)
		require.NoError(t, err)
		require.NoError(t, store.Release(ctx, key, "t"))
	}
	memCheckShards(t, store)
	assert.Equal(t, n/20, store.Len(), "the completed records are left")

	for i := 0; i < n; i += 20 {
		require.NoError(t, store.Delete(ctx, memLayoutKey(i)))
	}
	memCheckShards(t, store)
	for i := range store.shards {
		sh := &store.shards[i]
		assert.True(t, sh.index.slots == nil && sh.entries == nil, "shard %d emptied gives its index and entries back", i)
		assert.True(t, sh.watchers == nil, "shard %d keeps no watchers", i)
	}
}

func TestMemoryStoreQuietStoreAllocatesNothing(t *testing.T) {
	// A shard that never held more than a few records keeps its small map
	// when it empties, so a store serving one request at a time allocates
	// nothing to claim and release.
	ctx := context.Background()
	store := NewMemoryStore()
	key := memLayoutKey(0)
	allocs := testing.AllocsPerRun(100, func() {
		_, _ = store.Claim(ctx, key, "t", time.Minute)
		_ = store.Release(ctx, key, "t")
	})
	assert.Zero(t, allocs)
	allocs = testing.AllocsPerRun(100, func() {
		_, _ = store.Claim(ctx, "a key of a caller's own", "t", time.Minute)
		_ = store.Release(ctx, "a key of a caller's own", "t")
	})
	assert.Zero(t, allocs, "nor for a key that is hashed")
}

func TestMemoryStoreWatchersGoAway(t *testing.T) {
	// The watchers map of a shard is made by the first Watch and dropped
	// when its last claim ends, whichever way it ends.
	ctx := context.Background()
	store := NewMemoryStore()
	key := memLayoutKey(0)
	sh, _ := store.shard(new(memKeyOf(key)))
	ends := map[string]func(){
		"complete": func() {
			require.NoError(t, store.Complete(ctx, key, "t", &Record{Response: Response{StatusCode: 200}}, time.Hour))
		},
		"release": func() { require.NoError(t, store.Release(ctx, key, "t")) },
		"delete":  func() { require.NoError(t, store.Delete(ctx, key)) },
	}
	for name, end := range ends {
		require.NoError(t, store.Delete(ctx, key))
		_, err := store.Claim(ctx, key, "t", time.Minute)
		require.NoError(t, err)
		assert.Nil(t, sh.watchers, "%s: no watcher yet", name)
		ch := store.watch(key)
		require.NotNil(t, ch)
		assert.Len(t, sh.watchers, 1, name)
		end()
		assert.Nil(t, sh.watchers, "%s: the map is gone", name)
		select {
		case _, open := <-ch:
			assert.False(t, open, name)
		default:
			t.Errorf("%s: the watcher's channel was not closed", name)
		}
	}
}

func TestMemoryStoreRefusesTokensTheRecordCannotName(t *testing.T) {
	ctx := context.Background()
	store := NewMemoryStore()
	key := StorageKey("", "long-token")
	long := strings.Repeat("t", recordMaxTokenLen+1)
	rec, err := store.Claim(ctx, key, long, time.Minute)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "token of 256 bytes is longer than 255")
	assert.Nil(t, rec)
	assert.Zero(t, store.Len(), "nothing was claimed")

	longest := strings.Repeat("t", recordMaxTokenLen)
	rec, err = store.Claim(ctx, key, longest, time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)
	require.NoError(t, store.Complete(ctx, key, longest, &Record{Response: Response{StatusCode: http.StatusCreated}}, time.Hour))
	got, err := store.Get(ctx, key)
	require.NoError(t, err)
	require.NotNil(t, got)
	assert.Equal(t, longest, got.Token)
	assert.NoError(t, store.Complete(ctx, key, longest, &Record{Response: Response{StatusCode: http.StatusCreated}}, time.Hour), "a re-sent Complete by the owner")
}

func TestMemoryStoreExpiryMovesWithItsRecord(t *testing.T) {
	// A removal moves the shard's last record into the hole: its expiry,
	// kept apart from it, must move too.
	ctx := context.Background()
	var now time.Time
	store := NewMemoryStore(WithClock(func() time.Time { return now }))
	sh := &store.shards[0]
	var keys []string
	for i := 0; len(keys) < 3; i++ {
		if k := memLayoutKey(i); memShardOf(store, k) == sh {
			keys = append(keys, k)
		}
	}
	for i, k := range keys {
		rec, err := store.Claim(ctx, k, "t", time.Duration(i+1)*time.Minute)
		require.NoError(t, err)
		require.Nil(t, rec)
	}
	require.NoError(t, store.Release(ctx, keys[0], "t")) // keys[2] moves to position 0
	memCheckShards(t, store)

	now = now.Add(2*time.Minute + time.Second) // past keys[1]'s lease, within keys[2]'s
	rec, err := store.Get(ctx, keys[1])
	require.NoError(t, err)
	assert.Nil(t, rec, "the 2-minute lease ran out")
	rec, err = store.Get(ctx, keys[2])
	require.NoError(t, err)
	require.NotNil(t, rec, "the 3-minute lease did not")
	assert.Equal(t, 59*time.Second, rec.LeaseRemaining)
}

// memShardOf returns the shard of s that holds key.
func memShardOf(s *MemoryStore, key string) *memShard {
	sh, _ := s.shard(new(memKeyOf(key)))
	return sh
}

func TestMemoryStoreChurn(t *testing.T) {
	// Random claims, take-overs of expired claims, completions, releases,
	// deletes and time passing over a few thousand keys keep every shard's
	// bookkeeping straight, and deleting every key empties the store.
	ctx := context.Background()
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	store := NewMemoryStore(WithClock(func() time.Time { return now }))
	rng := rand.New(rand.NewPCG(5, 6))
	const keys = 5000
	var claimed, completed int
	for step := range 200_000 {
		key := memLayoutKey(rng.IntN(keys))
		token := "t" + key[:4]
		switch rng.IntN(6) {
		case 0, 1:
			rec, err := store.Claim(ctx, key, token, time.Duration(1+rng.IntN(5))*time.Second)
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
			err := store.Complete(ctx, key, token, &Record{Response: Response{StatusCode: 200}}, time.Second)
			if err == nil {
				completed++
			} else {
				require.ErrorIs(t, err, ErrNotOwner)
			}
		case 5:
			now = now.Add(time.Duration(rng.IntN(300)) * time.Millisecond)
		}
		if step%20_000 == 0 {
			memCheckShards(t, store)
		}
	}
	memCheckShards(t, store)
	assert.Greater(t, claimed, 10_000)
	assert.Greater(t, completed, 100)
	for i := range keys {
		require.NoError(t, store.Delete(ctx, memLayoutKey(i)))
	}
	memCheckShards(t, store)
	require.Zero(t, store.Len())
}
