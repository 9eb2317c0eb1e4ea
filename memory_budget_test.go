package idempotency

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// memHeap returns the bytes of live heap after collections; two, so that
// what sync.Pool caches are dropped as well.
func memHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func TestMemoryStoreMaxBytesThroughMiddleware(t *testing.T) {
	// A store with an 8 MiB budget behind the middleware, flooded with
	// 64 KiB responses under distinct keys: it answers 503 store-full
	// before its usage passes the budget, and the heap grows by about the
	// budget, not by what was sent.
	const budget, bodySize, requests = 8 << 20, 64 << 10, 400
	body := []byte(strings.Repeat("x", bodySize))
	before := memHeap()
	store := NewMemoryStore(WithMaxBytes(budget))
	h := New(Config{Store: store})(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write(body)
	}))

	statuses := map[int]int{}
	firstFull := -1
	for i := range requests {
		req := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader("{}"))
		req.Header.Set("Idempotency-Key", fmt.Sprint("key-", i))
		rr := httptest.NewRecorder()
		h.ServeHTTP(rr, req)
		statuses[rr.Code]++
		require.LessOrEqual(t, store.bytes.Load(), int64(budget), "request %d: usage passed the budget", i)
		if rr.Code == http.StatusServiceUnavailable {
			var p map[string]any
			require.NoError(t, json.Unmarshal(rr.Body.Bytes(), &p))
			require.True(t, strings.HasSuffix(fmt.Sprint(p["type"]), "#store-full"), "problem type %v", p["type"])
			if firstFull < 0 {
				firstFull = i
			}
			continue
		}
		require.Equal(t, http.StatusCreated, rr.Code, "request %d", i)
	}
	after := memHeap()
	runtime.KeepAlive(store)
	runtime.KeepAlive(h)
	t.Logf("statuses %v, the first 503 at request %d; store %d bytes, %d records; heap grew %d KiB for a budget of %d KiB",
		statuses, firstFull, store.bytes.Load(), store.Len(), (int64(after)-int64(before))>>10, budget>>10)
	require.Positive(t, firstFull, "the store filled up")
	assert.Greater(t, statuses[http.StatusServiceUnavailable], requests/2)
	assert.Less(t, int64(after)-int64(before), int64(2*budget), "heap growth")
	memCheckShards(t, store)
}

func TestMemoryStoreCompleteOverBudget(t *testing.T) {
	// A completion that does not fit keeps the terminal not-stored record:
	// same token and fingerprint, the original status and Location, and
	// the error says the response was not kept. The key stays completed.
	ctx := context.Background()
	tests := []struct {
		name   string
		header http.Header
		want   http.Header
	}{
		{"WithLocation", http.Header{"Content-Type": {"text/plain"}, "Location": {"/orders/7"}}, http.Header{"Location": {"/orders/7"}}},
		{"WithoutLocation", http.Header{"Content-Type": {"text/plain"}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const budget = 64 << 10
			store := NewMemoryStore(WithMaxBytes(budget))
			key := StorageKey("", "over")
			_, err := store.Claim(ctx, key, "owner", time.Minute)
			require.NoError(t, err)
			fp := []byte("0123456789abcdef0123456789abcdef")
			err = store.Complete(ctx, key, "owner", &Record{
				Fingerprint: fp,
				Response:    Response{StatusCode: http.StatusCreated, Header: tt.header, Body: make([]byte, budget)},
			}, time.Hour)
			require.ErrorIs(t, err, ErrStoreFull)

			want := &Record{
				State:       StateCompleted,
				Token:       "owner",
				Fingerprint: fp,
				Response:    Response{StatusCode: http.StatusCreated, Header: tt.want, NotStored: "store_full"},
			}
			got, err := store.Get(ctx, key)
			require.NoError(t, err)
			assert.Equal(t, want, got)
			got, err = store.Claim(ctx, key, "retry", time.Minute)
			require.NoError(t, err)
			assert.Equal(t, want, got, "a retry finds the key completed, never released")

			assert.NoError(t, store.Complete(ctx, key, "owner", memSmallRecord(), time.Hour), "a re-sent Complete")
			assert.ErrorIs(t, store.Release(ctx, key, "owner"), ErrNotOwner, "a completed key is never released")
			memCheckShards(t, store)
			assert.LessOrEqual(t, store.bytes.Load(), int64(budget))
		})
	}
}

func TestMemoryStoreClaimOverBudget(t *testing.T) {
	// Claims of new keys are refused once the next one would not fit;
	// existing keys are still served and nothing live is evicted.
	ctx := context.Background()
	store, clock := newMemTestStore(WithMaxBytes(10 * memClaimSize("owner")))
	var claimed []string
	for i := 0; ; i++ {
		key := memLayoutKey(i)
		_, err := store.Claim(ctx, key, "owner", time.Minute)
		if err != nil {
			require.ErrorIs(t, err, ErrStoreFull)
			break
		}
		claimed = append(claimed, key)
	}
	require.Len(t, claimed, 10)
	rec, err := store.Claim(ctx, claimed[0], "other", time.Minute)
	require.NoError(t, err)
	assert.Equal(t, StateInFlight, rec.State, "existing keys are served at the budget")
	for _, key := range claimed {
		rec, err := store.Get(ctx, key)
		require.NoError(t, err)
		require.NotNil(t, rec, "a live claim was evicted")
	}

	clock.Advance(2 * time.Minute)
	rec, err = store.Claim(ctx, memLayoutKey(100), "owner", time.Minute)
	require.NoError(t, err, "expired claims are swept to make room")
	assert.Nil(t, rec)
	memCheckShards(t, store)
}

func TestMemoryStoreBytesReturnToZero(t *testing.T) {
	// Whatever way records go (released, deleted, taken over, expired and
	// swept inline or by the sweeper), the byte count returns to zero.
	ctx := context.Background()
	for _, sweeper := range []bool{false, true} {
		t.Run(fmt.Sprint("sweeper=", sweeper), func(t *testing.T) {
			opts := []MemoryOption{WithMaxBytes(1 << 20)}
			if sweeper {
				opts = append(opts, WithSweepInterval(time.Millisecond))
			}
			store, clock := newMemTestStore(opts...)
			t.Cleanup(func() { assert.NoError(t, store.Close()) })
			const n = 2000
			full := 0
			for i := range n {
				key := memLayoutKey(i)
				_, err := store.Claim(ctx, key, "owner", time.Second)
				if err != nil {
					require.ErrorIs(t, err, ErrStoreFull)
					continue
				}
				rec := memSmallRecord()
				rec.Response.Body = make([]byte, 8*i)
				switch i % 5 {
				case 0:
					require.NoError(t, store.Release(ctx, key, "owner"))
				case 1, 2:
					if err := store.Complete(ctx, key, "owner", rec, time.Second); err != nil {
						require.ErrorIs(t, err, ErrStoreFull)
						full++
					}
				case 3:
					require.NoError(t, store.Delete(ctx, key))
				}
				// 4: left in flight, to expire
			}
			memCheckShards(t, store)
			require.Positive(t, store.bytes.Load())
			assert.Positive(t, full, "some responses did not fit")

			// Take over some of the expired claims, then let all expire.
			clock.Advance(2 * time.Second)
			for i := 4; i < 100; i += 5 {
				_, err := store.Claim(ctx, memLayoutKey(i), "next", time.Second)
				require.NoError(t, err)
			}
			clock.Advance(2 * time.Second)
			if sweeper {
				require.Eventually(t, func() bool { return store.Len() == 0 }, 10*time.Second, time.Millisecond)
			} else {
				for i := 0; store.Len() > 0; i++ {
					key := StorageKey("churn", fmt.Sprint(i))
					_, err := store.Claim(ctx, key, "t", time.Minute)
					require.NoError(t, err)
					require.NoError(t, store.Release(ctx, key, "t"))
					require.Less(t, i, 100_000)
				}
			}
			memCheckShards(t, store)
			assert.Zero(t, store.bytes.Load())
		})
	}
}

func TestMemoryStoreHeapPerRecord(t *testing.T) {
	// The heap a completed record costs beyond its body, with a 100-byte
	// body, a 32-byte fingerprint and a typical header, and how close the
	// byte budget's estimate of it is.
	//
	// A record is held as the Record passed to Complete: the Record (112
	// bytes) and its http.Header map (400 bytes for up to eight names)
	// are most of the figure, whatever the store does; its own map slot
	// is about 160.
	ctx := context.Background()
	const n = 10_000
	keys := make([]string, n)
	tokens := make([]string, n)
	for i := range keys {
		keys[i] = StorageKey("heap", fmt.Sprint(i))
	}
	store := NewMemoryStore()
	before := memHeap()
	for i := range n {
		tokens[i] = fmt.Sprintf("%027d", i) // as long as the middleware's
		_, err := store.Claim(ctx, keys[i], tokens[i], time.Hour)
		require.NoError(t, err)
		header := http.Header{}
		header.Set("Content-Type", "application/json")
		header.Set("Location", fmt.Sprint("/orders/", i))
		rec := &Record{
			Fingerprint: make([]byte, 32),
			Response:    Response{StatusCode: http.StatusCreated, Header: header.Clone(), Body: make([]byte, 100)},
		}
		require.NoError(t, store.Complete(ctx, keys[i], tokens[i], rec, time.Hour))
	}
	after := memHeap()
	runtime.KeepAlive(keys)
	runtime.KeepAlive(store)
	perRecord := float64(int64(after)-int64(before)) / n
	charged := float64(store.bytes.Load()) / n
	t.Logf("heap per record %.0f bytes, %.0f beyond the 100-byte body; the budget charges %.0f", perRecord, perRecord-100, charged)
	assert.LessOrEqual(t, perRecord-100, 850.0, "heap per record beyond the body")
	assert.InDelta(t, perRecord, charged, perRecord/4, "the budget's estimate is close to the heap")
}
