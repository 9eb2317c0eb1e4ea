package idempotency_test

// Benchmarks of the middleware's cost, all with one harness so that their
// numbers compare: a handler that drains the request body, sets
// Content-Type: application/json and writes 201 with a 100-byte JSON body;
// requests built with httptest.NewRequest and a 100-byte JSON body; an
// httptest.ResponseRecorder; and the key header taken from a value built
// before the timer. The cost of the middleware is a benchmark's figure minus
// the figure of "bare", the handler alone, in the same run.
//
//	go test -run '^$' -bench . -benchmem
//	IDEMPOTENCY_REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench Redis -benchmem

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// benchRequestBody and benchResponseBody are the 100-byte JSON bodies of
// the harness.
var (
	benchRequestBody  = []byte(`{"customer":"cus_0001","item":"book","quantity":1,"currency":"EUR","amount":1999,"note":"gift wrap"}`)
	benchResponseBody = []byte(`{"id":"ord_000000000001","status":"created","item":"book","quantity":1,"amount":1999,"currency":"EUR"}`)
)

// benchHandler is the harness handler.
func benchHandler(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_, _ = w.Write(benchResponseBody)
}

// benchKeys returns n distinct key header values, unique to this call,
// built before the timer starts so that building keys is not charged to the
// loop. They share one string and one backing array, so that holding a
// million of them costs the collector two objects, not two million.
func benchKeys(n int) [][]string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	run := hex.EncodeToString(b[:])
	const format = "%s-%08x-4b1e-9c2d-%012x" // as long for every i below 1<<48
	size := len(fmt.Sprintf(format, run, 0, 0))
	var all strings.Builder
	all.Grow(n * size)
	for i := range n {
		fmt.Fprintf(&all, format, run, i>>16, i)
	}
	text := all.String()
	values := make([]string, n)
	keys := make([][]string, n)
	for i := range keys {
		values[i] = text[i*size : (i+1)*size]
		keys[i] = values[i : i+1 : i+1]
	}
	return keys
}

// benchServe sends one harness request with the key header value key (nil:
// no key) through h and returns the recorder.
func benchServe(h http.Handler, method string, key []string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, "/orders", bytes.NewReader(benchRequestBody))
	if key != nil {
		r.Header["Idempotency-Key"] = key
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// benchCheck fails the benchmark unless one request gets status and, for a
// replay, the marker.
func benchCheck(b *testing.B, h http.Handler, method string, key []string, status int, replayed bool) {
	b.Helper()
	w := benchServe(h, method, key)
	if w.Code != status || (w.Header().Get(idempotency.ReplayedHeader) == "true") != replayed {
		b.Fatalf("got %d (replayed %q), want %d (replayed %v): %s",
			w.Code, w.Header().Get(idempotency.ReplayedHeader), status, replayed, w.Body)
	}
}

// benchHoldKey claims key in store under another token, so that requests
// with it find it in flight.
func benchHoldKey(b testing.TB, store idempotency.Store, key []string) {
	b.Helper()
	rec, err := store.Claim(context.Background(), idempotency.StorageKey("", key[0]), "held-by-another-request", time.Hour)
	require.NoError(b, err)
	require.Nil(b, rec)
}

// benchCPUTime returns the CPU time every thread of the process has used so
// far, garbage collection included, and whether the system tells it (Linux
// /proc only).
func benchCPUTime() (time.Duration, bool) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return 0, false
	}
	var total time.Duration
	for _, task := range tasks {
		stat, err := os.ReadFile("/proc/self/task/" + task.Name() + "/schedstat")
		if err != nil {
			continue // the thread exited
		}
		ns, err := strconv.ParseInt(strings.Fields(string(stat))[0], 10, 64)
		if err != nil {
			return 0, false
		}
		total += time.Duration(ns)
	}
	return total, true
}

// benchCPU starts measuring CPU time; the function it returns reports it
// per operation as cpu-ns/op. CPU time, unlike ns/op, does not count the
// time the benchmark waited for a CPU, so on a busy shared machine it is the
// steadier measure of what an operation costs. Call it right before the
// loop and the function right after it.
//
// It first collects the garbage that the benchmarks before this one left,
// such as the store of a hundred thousand records that "first" fills: left
// to the collector, it would be cleared while this benchmark runs and
// charged to it.
func benchCPU(b *testing.B) func() {
	runtime.GC()
	start, ok := benchCPUTime()
	return func() {
		b.StopTimer()
		end, ok2 := benchCPUTime()
		if ok && ok2 && b.N > 0 {
			b.ReportMetric(float64(end-start)/float64(b.N), "cpu-ns/op")
		}
	}
}

func BenchmarkMiddleware(b *testing.B) {
	bare := http.HandlerFunc(benchHandler)
	newMiddleware := func() (http.Handler, *idempotency.MemoryStore) {
		store := idempotency.NewMemoryStore()
		return idempotency.New(idempotency.Config{Store: store})(bare), store
	}
	fixed := benchKeys(1)[0]

	b.Run("bare", func(b *testing.B) {
		b.ReportAllocs()
		defer benchCPU(b)()
		for b.Loop() {
			benchServe(bare, http.MethodPost, fixed)
		}
	})
	b.Run("pass-through", func(b *testing.B) {
		h, _ := newMiddleware()
		b.ReportAllocs()
		defer benchCPU(b)()
		for b.Loop() {
			benchServe(h, http.MethodGet, fixed)
		}
	})
	b.Run("first", func(b *testing.B) {
		h, _ := newMiddleware()
		keys := benchKeys(b.N)
		b.ReportAllocs()
		defer benchCPU(b)()
		b.ResetTimer()
		for i := range b.N {
			benchServe(h, http.MethodPost, keys[i])
		}
	})
	b.Run("replay", func(b *testing.B) {
		h, _ := newMiddleware()
		benchCheck(b, h, http.MethodPost, fixed, http.StatusCreated, false)
		benchCheck(b, h, http.MethodPost, fixed, http.StatusCreated, true)
		b.ReportAllocs()
		defer benchCPU(b)()
		for b.Loop() {
			benchServe(h, http.MethodPost, fixed)
		}
	})
	b.Run("conflict", func(b *testing.B) {
		h, store := newMiddleware()
		benchHoldKey(b, store, fixed)
		benchCheck(b, h, http.MethodPost, fixed, http.StatusConflict, false)
		b.ReportAllocs()
		defer benchCPU(b)()
		for b.Loop() {
			benchServe(h, http.MethodPost, fixed)
		}
	})
	b.Run("parallel-bare", func(b *testing.B) {
		b.ReportAllocs()
		defer benchCPU(b)()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				benchServe(bare, http.MethodPost, fixed)
			}
		})
	})
	b.Run("parallel-first", func(b *testing.B) {
		h, _ := newMiddleware()
		keys := benchKeys(b.N)
		var next atomic.Int64
		b.ReportAllocs()
		defer benchCPU(b)()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				benchServe(h, http.MethodPost, keys[next.Add(1)-1])
			}
		})
	})
	b.Run("parallel-replay", func(b *testing.B) {
		h, _ := newMiddleware()
		benchCheck(b, h, http.MethodPost, fixed, http.StatusCreated, false)
		b.ReportAllocs()
		defer benchCPU(b)()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				benchServe(h, http.MethodPost, fixed)
			}
		})
	})
}

// BenchmarkMemoryStoreRecord reports the heap that the memory store keeps
// per completed record of the harness's 100-byte response, beyond the body
// itself. The alloc tests hold it to its budget.
func BenchmarkMemoryStoreRecord(b *testing.B) {
	b.ReportAllocs()
	perRecord := benchHeapPerRecord(b, b.N)
	b.ReportMetric(perRecord, "heap-B/record")
	b.ReportMetric(perRecord-float64(len(benchResponseBody)), "heap-B/record-over-body")
}

// benchHeapPerRecord completes n first executions of the harness through
// the middleware on a memory store and returns the heap growth, after
// garbage collection, divided by n.
func benchHeapPerRecord(tb testing.TB, n int) float64 {
	tb.Helper()
	keys := benchKeys(n)
	store := idempotency.NewMemoryStore()
	h := idempotency.New(idempotency.Config{Store: store})(http.HandlerFunc(benchHandler))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if b, ok := tb.(*testing.B); ok {
		b.ResetTimer()
	}
	for _, key := range keys {
		benchServe(h, http.MethodPost, key)
	}
	if b, ok := tb.(*testing.B); ok {
		b.StopTimer()
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(keys)
	require.Equal(tb, n, store.Len())
	runtime.KeepAlive(store)
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
}

// benchRoundTrips counts the commands (each a round trip) and the pipelines
// (one round trip each) a go-redis client sends.
type benchRoundTrips struct{ n atomic.Int64 }

func (h *benchRoundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *benchRoundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmd)
	}
}

func (h *benchRoundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.n.Add(1)
		return next(ctx, cmds)
	}
}

// benchRedisPrefix returns a key prefix no other run uses and deletes every
// key under it when tb ends. It never flushes: the Redis may be shared.
func benchRedisPrefix(tb testing.TB, client *redis.Client) string {
	tb.Helper()
	var b [8]byte
	_, _ = rand.Read(b[:])
	prefix := "idempotency-bench:" + hex.EncodeToString(b[:]) + ":"
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		iter := client.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		var batch []string
		for iter.Next(ctx) {
			if batch = append(batch, iter.Val()); len(batch) == 1000 {
				assert.NoError(tb, client.Unlink(ctx, batch...).Err())
				batch = batch[:0]
			}
		}
		if len(batch) > 0 {
			assert.NoError(tb, client.Unlink(ctx, batch...).Err())
		}
		assert.NoError(tb, iter.Err(), "cleaning up %s*", prefix)
	})
	return prefix
}

// benchCalibrate returns the mean time of one call of f over n calls.
func benchCalibrate(n int, f func()) float64 {
	start := time.Now()
	for range n {
		f()
	}
	return float64(time.Since(start).Nanoseconds()) / float64(n)
}

// BenchmarkRedis runs first execution, replay and conflict on the Redis
// store against the real Redis named by IDEMPOTENCY_REDIS_ADDR, and PING on
// the same client for scale. Besides ns/op each reports roundtrips/op, the
// Redis round trips of one request, and pings/op, its cost over the bare
// handler in PINGs timed on the same client just before.
func BenchmarkRedis(b *testing.B) {
	addr := os.Getenv("IDEMPOTENCY_REDIS_ADDR")
	if addr == "" {
		b.Skip("set IDEMPOTENCY_REDIS_ADDR=host:port to benchmark the Redis store")
	}
	client := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	b.Cleanup(func() { _ = client.Close() })
	ctx := context.Background()
	if err := client.Ping(ctx).Err(); err != nil {
		b.Fatalf("IDEMPOTENCY_REDIS_ADDR=%s is set but Redis does not answer: %v", addr, err)
	}
	trips := &benchRoundTrips{}
	client.AddHook(trips)
	store := idempotency.NewRedisStore(client, idempotency.WithKeyPrefix(benchRedisPrefix(b, client)))
	bare := http.HandlerFunc(benchHandler)
	// A short TTL so that nothing a killed run leaves behind lives long.
	h := idempotency.New(idempotency.Config{Store: store, TTL: 10 * time.Minute})(bare)
	fixed := benchKeys(1)[0]
	ping := func() {
		if err := client.Ping(ctx).Err(); err != nil {
			b.Fatal(err)
		}
	}

	// measure runs the loop and reports the round trips and the cost in
	// PINGs over the bare handler, calibrated just before.
	measure := func(b *testing.B, loop func(b *testing.B)) {
		pingNs := benchCalibrate(2000, ping)
		bareNs := benchCalibrate(2000, func() { benchServe(bare, http.MethodPost, fixed) })
		b.ReportAllocs()
		b.ResetTimer()
		start := trips.n.Load()
		loop(b)
		b.StopTimer()
		opNs := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
		b.ReportMetric(float64(trips.n.Load()-start)/float64(b.N), "roundtrips/op")
		b.ReportMetric((opNs-bareNs)/pingNs, "pings/op")
	}

	b.Run("ping", func(b *testing.B) {
		b.ReportAllocs()
		defer benchCPU(b)()
		for b.Loop() {
			ping()
		}
	})
	b.Run("first", func(b *testing.B) {
		keys := benchKeys(b.N)
		benchCheck(b, h, http.MethodPost, benchKeys(1)[0], http.StatusCreated, false) // loads the scripts
		measure(b, func(b *testing.B) {
			for i := range b.N {
				benchServe(h, http.MethodPost, keys[i])
			}
		})
	})
	b.Run("replay", func(b *testing.B) {
		benchServe(h, http.MethodPost, fixed)
		benchCheck(b, h, http.MethodPost, fixed, http.StatusCreated, true)
		measure(b, func(b *testing.B) {
			for range b.N {
				benchServe(h, http.MethodPost, fixed)
			}
		})
	})
	b.Run("conflict", func(b *testing.B) {
		held := benchKeys(1)[0]
		benchHoldKey(b, store, held)
		benchCheck(b, h, http.MethodPost, held, http.StatusConflict, false)
		measure(b, func(b *testing.B) {
			for range b.N {
				benchServe(h, http.MethodPost, held)
			}
		})
	})
}

// TestRoundTripsPerRequest holds the Redis store to its round-trip budget at
// the middleware level: a first execution makes 2 (claim, complete), a
// replay 1 and a conflict 1, once the scripts are loaded.
func TestRoundTripsPerRequest(t *testing.T) {
	m := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: m.Addr()})
	t.Cleanup(func() { _ = client.Close() })
	trips := &benchRoundTrips{}
	client.AddHook(trips)
	store := idempotency.NewRedisStore(client)
	h := idempotency.New(idempotency.Config{Store: store})(http.HandlerFunc(benchHandler))
	keys := benchKeys(3)

	// The first request loads the scripts (EVALSHA, then EVAL).
	require.Equal(t, http.StatusCreated, benchServe(h, http.MethodPost, keys[0]).Code)
	held := keys[2]
	rec, err := store.Claim(t.Context(), idempotency.StorageKey("", held[0]), "held-by-another-request", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)

	cases := []struct {
		name     string
		key      []string
		status   int
		replayed bool
		trips    int64
	}{
		{"first", keys[1], http.StatusCreated, false, 2},
		{"replay", keys[1], http.StatusCreated, true, 1},
		{"conflict", held, http.StatusConflict, false, 1},
		{"pass-through", nil, http.StatusCreated, false, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := trips.n.Load()
			w := benchServe(h, http.MethodPost, tc.key)
			assert.Equal(t, tc.status, w.Code)
			assert.Equal(t, tc.replayed, w.Header().Get(idempotency.ReplayedHeader) == "true")
			assert.Equal(t, tc.trips, trips.n.Load()-start, "Redis round trips")
		})
	}
}

// The tests below hold the fast paths of the lifecycle to the behaviour
// of the plain one: the handler's context made only on demand, and the
// pooled per-request state.

// perfLosingStore is a memory store whose renewals always find the key
// taken over.
type perfLosingStore struct{ *idempotency.MemoryStore }

func (perfLosingStore) Extend(context.Context, string, string, time.Duration) error {
	return idempotency.ErrNotOwner
}

// TestPerfLazyContextLeaseLost checks that a handler that never looked at
// its context before the lease was lost still finds it cancelled with cause
// ErrLeaseLost, and that the context carries the key throughout.
func TestPerfLazyContextLeaseLost(t *testing.T) {
	store := perfLosingStore{idempotency.NewMemoryStore()}
	type seen struct {
		key      string
		errAfter error
		cause    error
	}
	got := make(chan seen, 1)
	lost := make(chan struct{})
	var once sync.Once
	observe := func(e idempotency.Event) {
		if e.Outcome == idempotency.OutcomeLeaseLost {
			once.Do(func() { close(lost) })
		}
	}
	h := idempotency.New(idempotency.Config{Store: store, LockTTL: 60 * time.Millisecond, Observer: observe})(http.HandlerFunc(
		func(w http.ResponseWriter, r *http.Request) {
			ctx := r.Context()
			key, _ := idempotency.KeyFromContext(ctx)
			select { // wait for the first renewal, which finds the key lost
			case <-lost:
			case <-time.After(5 * time.Second):
			}
			got <- seen{key: key, errAfter: ctx.Err(), cause: context.Cause(ctx)}
			w.WriteHeader(http.StatusCreated)
		}))
	benchServe(h, http.MethodPost, []string{"lazy"})
	s := <-got
	assert.Equal(t, "lazy", s.key)
	assert.ErrorIs(t, s.errAfter, context.Canceled)
	assert.ErrorIs(t, s.cause, idempotency.ErrLeaseLost)
}

// TestPerfContextEndsWithHandler checks that the handler's context, and any
// context derived from it, is cancelled once the handler returns, whether or
// not the handler used it, and that derived contexts carry the key.
func TestPerfContextEndsWithHandler(t *testing.T) {
	for _, touch := range []bool{false, true} {
		t.Run(fmt.Sprintf("touched=%v", touch), func(t *testing.T) {
			var kept, derived context.Context
			var derivedKey string
			h := idempotency.New(idempotency.Config{})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				kept = r.Context()
				if touch {
					var cancel context.CancelFunc
					derived, cancel = context.WithTimeout(r.Context(), time.Hour)
					t.Cleanup(cancel)
					derivedKey, _ = idempotency.KeyFromContext(derived)
					assert.NoError(t, derived.Err())
				}
				assert.NoError(t, kept.Err())
				w.WriteHeader(http.StatusCreated)
			}))
			require.Equal(t, http.StatusCreated, benchServe(h, http.MethodPost, []string{"k"}).Code)
			select {
			case <-kept.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the handler's context was not cancelled when it returned")
			}
			assert.ErrorIs(t, kept.Err(), context.Canceled)
			assert.ErrorIs(t, context.Cause(kept), context.Canceled)
			if touch {
				assert.Equal(t, "k", derivedKey)
				assert.ErrorIs(t, derived.Err(), context.Canceled)
			}
			key, ok := idempotency.KeyFromContext(kept)
			assert.True(t, ok)
			assert.Equal(t, "k", key)
		})
	}
}

// TestPerfPooledStateIsolated runs many requests at once, some outliving a
// third of LockTTL so that their renewal fires, each with its own body and
// response, and checks that every first execution and every replay sees
// its own request and response only: pooled state never leaks between
// requests.
func TestPerfPooledStateIsolated(t *testing.T) {
	h := idempotency.New(idempotency.Config{LockTTL: 600 * time.Millisecond})(http.HandlerFunc(
		func(w http.ResponseWriter, r *http.Request) {
			body, err := io.ReadAll(r.Body)
			assert.NoError(t, err)
			key, _ := idempotency.KeyFromContext(r.Context())
			if bytes.HasSuffix(body, []byte("slow")) {
				time.Sleep(220 * time.Millisecond) // past the renewal at 200 ms
			}
			w.Header().Set("X-Key", key)
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(key + ":" + string(body)))
		}))
	const workers, perWorker = 8, 30
	done := make(chan struct{})
	for g := range workers {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := range perWorker {
				key := fmt.Sprintf("w%d-%d", g, i)
				body := key
				if i%10 == 0 {
					body += "-slow"
				}
				for attempt := range 2 {
					r := httptest.NewRequest(http.MethodPost, "/orders", bytes.NewReader([]byte(body)))
					r.Header.Set("Idempotency-Key", key)
					w := httptest.NewRecorder()
					h.ServeHTTP(w, r)
					if !assert.Equal(t, http.StatusCreated, w.Code) {
						return
					}
					assert.Equal(t, key+":"+body, w.Body.String())
					assert.Equal(t, key, w.Header().Get("X-Key"))
					assert.Equal(t, attempt == 1, w.Header().Get(idempotency.ReplayedHeader) == "true", "key %s attempt %d", key, attempt)
				}
			}
		}()
	}
	for range workers {
		<-done
	}
}

func TestBenchKeysAreDistinctKeys(t *testing.T) {
	keys := benchKeys(70_000)
	seen := make(map[string]bool, len(keys))
	for i, k := range keys {
		require.Len(t, k, 1)
		require.Len(t, k[0], 40, "key %d", i)
		require.False(t, seen[k[0]], "key %d repeats", i)
		seen[k[0]] = true
	}
	assert.Equal(t, fmt.Sprintf("%s-%08x-4b1e-9c2d-%012x", keys[0][0][:8], 1, 65_537), keys[65_537][0])
}
