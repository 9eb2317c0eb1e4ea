package idempotency_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"regexp"
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
	"github.com/f8e778d0/idempotency/storetest"
)

// redisTestKey returns a storage key shaped like the middleware's: 64
// hexadecimal digits.
func redisTestKey(n int) string {
	return fmt.Sprintf("%064x", n)
}

// redisMiniStore returns a RedisStore on its own miniredis, the miniredis,
// and the client (closed at cleanup).
func redisMiniStore(t *testing.T, opts ...idempotency.RedisOption) (*idempotency.RedisStore, *miniredis.Miniredis, *redis.Client) {
	t.Helper()
	m := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	return idempotency.NewRedisStore(client, opts...), m, client
}

// TestRedisStoreConformance runs the store conformance suite on Redis
// stores on miniredis.
func TestRedisStoreConformance(t *testing.T) {
	// Each store gets its own miniredis, so that advancing one store's
	// clock never touches another subtest's records.
	var servers sync.Map // *testing.T -> *miniredis.Miniredis
	storetest.Run(t,
		func(t *testing.T) idempotency.Store {
			store, m, _ := redisMiniStore(t)
			servers.Store(t, m)
			t.Cleanup(func() { servers.Delete(t) })
			return store
		},
		storetest.WithAdvance(func(t *testing.T, d time.Duration) {
			m, ok := servers.Load(t)
			require.True(t, ok, "advance called with a test that built no store")
			m.(*miniredis.Miniredis).FastForward(d)
		}),
	)
}

func TestRedisStoreNilClientPanics(t *testing.T) {
	assert.PanicsWithValue(t, "idempotency: NewRedisStore needs a non-nil redis client", func() {
		idempotency.NewRedisStore(nil)
	})
}

func TestRedisStoreConstructorDoesNoIO(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = client.Close() })
	counter := &redisCountingHook{}
	client.AddHook(counter)

	idempotency.NewRedisStore(client, idempotency.WithKeyPrefix("p:"))

	assert.Zero(t, counter.total())
	assert.Zero(t, client.PoolStats().TotalConns, "no connection was opened")
}

func TestRedisStoreKeyPrefix(t *testing.T) {
	tests := []struct {
		name   string
		opts   []idempotency.RedisOption
		prefix string
	}{
		{"default", nil, "idempotency:"},
		{"custom", []idempotency.RedisOption{idempotency.WithKeyPrefix("orders:idem:")}, "orders:idem:"},
		{"empty", []idempotency.RedisOption{idempotency.WithKeyPrefix("")}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store, m, _ := redisMiniStore(t, tt.opts...)
			ctx := t.Context()
			key := redisTestKey(1)

			rec, err := store.Claim(ctx, key, "tok", time.Minute)
			require.NoError(t, err)
			require.Nil(t, rec)

			assert.Equal(t, []string{tt.prefix + key}, m.Keys())
			require.NoError(t, store.Delete(ctx, key))
			assert.Empty(t, m.Keys())
		})
	}
}

func TestRedisStoreLifecycle(t *testing.T) {
	store, m, _ := redisMiniStore(t)
	ctx := t.Context()
	key := redisTestKey(2)
	const lease = 30 * time.Second

	rec, err := store.Claim(ctx, key, "a", lease)
	require.NoError(t, err)
	require.Nil(t, rec, "an absent key is claimed")

	m.FastForward(10 * time.Second)
	rec, err = store.Claim(ctx, key, "a", lease)
	require.NoError(t, err)
	assert.Nil(t, rec, "a claim re-sent with the same token holds the key")
	assert.Equal(t, lease, m.TTL("idempotency:"+key), "a re-sent claim renews the lease")

	m.FastForward(5 * time.Second)
	rec, err = store.Claim(ctx, key, "b", lease)
	require.NoError(t, err)
	require.NotNil(t, rec)
	assert.Equal(t, idempotency.StateInFlight, rec.State)
	assert.Equal(t, "a", rec.Token)
	assert.Equal(t, 25*time.Second, rec.LeaseRemaining, "PTTL as Redis keeps it")

	got, err := store.Get(ctx, key)
	require.NoError(t, err)
	assert.Equal(t, rec, got)

	require.ErrorIs(t, store.Extend(ctx, key, "b", lease), idempotency.ErrNotOwner)
	require.NoError(t, store.Extend(ctx, key, "a", time.Minute))
	assert.Equal(t, time.Minute, m.TTL("idempotency:"+key))

	done := &idempotency.Record{
		State: idempotency.StateCompleted,
		Token: "a",
		Response: idempotency.Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Location": {"/orders/7"}},
			Body:       []byte(`{"id":7}`),
		},
	}
	require.ErrorIs(t, store.Complete(ctx, key, "b", done, time.Hour), idempotency.ErrNotOwner)
	require.NoError(t, store.Complete(ctx, key, "a", done, time.Hour))
	assert.Equal(t, time.Hour, m.TTL("idempotency:"+key), "the TTL is held by Redis")
	require.NoError(t, store.Complete(ctx, key, "a", done, 2*time.Hour), "a re-sent complete is harmless")
	assert.Equal(t, time.Hour, m.TTL("idempotency:"+key), "and leaves the record as it is")

	rec, err = store.Claim(ctx, key, "c", lease)
	require.NoError(t, err)
	assert.Equal(t, done, rec)

	for name, err := range map[string]error{
		"extend":   store.Extend(ctx, key, "a", lease),
		"release":  store.Release(ctx, key, "a"),
		"complete": store.Complete(ctx, key, "c", done, time.Hour),
	} {
		assert.ErrorIs(t, err, idempotency.ErrNotOwner, name)
	}

	m.FastForward(time.Hour)
	got, err = store.Get(ctx, key)
	require.NoError(t, err)
	assert.Nil(t, got, "an expired record is gone")
	rec, err = store.Claim(ctx, key, "c", lease)
	require.NoError(t, err)
	assert.Nil(t, rec, "an expired record's key can be claimed again")

	require.NoError(t, store.Release(ctx, key, "c"))
	assert.Empty(t, m.Keys(), "a released key leaves nothing behind")
	require.ErrorIs(t, store.Release(ctx, key, "c"), idempotency.ErrNotOwner)
}

func TestRedisStoreLeaseExpiry(t *testing.T) {
	store, m, _ := redisMiniStore(t)
	ctx := t.Context()
	key := redisTestKey(3)

	rec, err := store.Claim(ctx, key, "old", 1500*time.Millisecond)
	require.NoError(t, err)
	require.Nil(t, rec)

	m.FastForward(1500 * time.Millisecond)
	rec, err = store.Claim(ctx, key, "new", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec, "a lapsed lease is taken over")

	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "old",
		Response: idempotency.Response{StatusCode: 200}}
	require.ErrorIs(t, store.Complete(ctx, key, "old", done, time.Hour), idempotency.ErrNotOwner)
	require.ErrorIs(t, store.Release(ctx, key, "old"), idempotency.ErrNotOwner)

	got, err := store.Get(ctx, key)
	require.NoError(t, err)
	require.NotNil(t, got)
	assert.Equal(t, "new", got.Token, "the stale owner changed nothing")
	assert.Equal(t, idempotency.StateInFlight, got.State)
}

func TestRedisStoreRecordRoundTrip(t *testing.T) {
	store, m, _ := redisMiniStore(t)
	ctx := t.Context()
	body := []byte("\x00\x01binary \xff\xfe body, not base64")
	tests := []struct {
		name string
		rec  idempotency.Record
	}{
		{
			name: "headers, fingerprint, binary body",
			rec: idempotency.Record{
				Fingerprint: []byte{0, 1, 2, 3, 0xff},
				Response: idempotency.Response{
					StatusCode: http.StatusAccepted,
					Header: http.Header{
						"Content-Type": {"application/octet-stream"},
						"Vary":         {"Accept", "Accept-Encoding"},
						"Link":         {"<a>, <b>", "<c>"},
					},
					Body: body,
				},
			},
		},
		{
			name: "not stored",
			rec: idempotency.Record{
				Response: idempotency.Response{
					StatusCode: http.StatusCreated,
					Header:     http.Header{"Location": {"/x"}},
					NotStored:  "hijacked",
				},
			},
		},
		{
			name: "status only",
			rec:  idempotency.Record{Response: idempotency.Response{StatusCode: http.StatusNoContent}},
		},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := redisTestKey(100 + i)
			rec := tt.rec
			rec.State = idempotency.StateCompleted
			rec.Token = "owner-token"

			claimed, err := store.Claim(ctx, key, rec.Token, time.Minute)
			require.NoError(t, err)
			require.Nil(t, claimed)
			require.NoError(t, store.Complete(ctx, key, rec.Token, &rec, time.Hour))

			got, err := store.Get(ctx, key)
			require.NoError(t, err)
			assert.Equal(t, &rec, got)

			raw, err := m.Get("idempotency:" + key)
			require.NoError(t, err)
			assert.True(t, strings.HasSuffix(raw, string(rec.Response.Body)), "the body is stored raw")
			assert.Equal(t, "\x02\x02\x0bowner-token", raw[:14], "version 2, state and token lead the value")
		})
	}
}

func TestRedisStoreCorruptRecord(t *testing.T) {
	tests := map[string]string{
		"json":            `{"state":2,"token":"t"}`,
		"empty":           "",
		"unknown version": "\x03\x01\x01t",
		"version zero":    "\x00\x01\x01t",
		"unknown state":   "\x02\x05\x01t",
		"truncated token": "\x02\x01\x09t",
		"in flight, more": "\x02\x01\x01tt",
		"truncated body":  "\x02\x02\x01t\xc8\x01\x00\x00\x00\x00\x05abc",
		"version 1 body":  "\x01\x02\x01t\xc8\x01\x00\x00\x00\x00\x05abc",
	}
	for name, value := range tests {
		t.Run(name, func(t *testing.T) {
			store, m, _ := redisMiniStore(t)
			ctx := t.Context()
			key := redisTestKey(4)
			require.NoError(t, m.Set("idempotency:"+key, value))

			rec, err := store.Claim(ctx, key, "t", time.Minute)
			require.ErrorIs(t, err, idempotency.ErrCorruptRecord, "never treated as absent")
			assert.Nil(t, rec)
			rec, err = store.Get(ctx, key)
			require.ErrorIs(t, err, idempotency.ErrCorruptRecord)
			assert.Nil(t, rec)

			raw, err := m.Get("idempotency:" + key)
			require.NoError(t, err)
			assert.Equal(t, value, raw, "the claim left the value alone")

			require.NoError(t, store.Delete(ctx, key), "an operator can clear it")
			rec, err = store.Claim(ctx, key, "t", time.Minute)
			require.NoError(t, err)
			assert.Nil(t, rec)
		})
	}
}

func TestRedisStoreCorruptHeaderOwnerChecks(t *testing.T) {
	store, m, _ := redisMiniStore(t)
	ctx := t.Context()
	key := redisTestKey(5)
	const value = "\x09\x01\x01t"
	require.NoError(t, m.Set("idempotency:"+key, value))

	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "t",
		Response: idempotency.Response{StatusCode: 200}}
	for name, err := range map[string]error{
		"extend":   store.Extend(ctx, key, "t", time.Minute),
		"complete": store.Complete(ctx, key, "t", done, time.Hour),
		"release":  store.Release(ctx, key, "t"),
	} {
		assert.ErrorIs(t, err, idempotency.ErrCorruptRecord, name)
	}
	raw, err := m.Get("idempotency:" + key)
	require.NoError(t, err)
	assert.Equal(t, value, raw, "nothing was written")
}

// redisVersion1Completed is a completed record as a release that wrote
// version 1 stored it, spelled out byte by byte: token "old", status 201,
// one header field (Location: /o/1), fingerprint "fp1" and body "ok".
const redisVersion1Completed = "\x01\x02\x03old" + "\xc9\x01" + "\x00" + "\x01\x01" +
	"\x08Location\x01\x04/o/1" + "\x03fp1" + "\x02ok"

func TestRedisStoreWritesVersion2(t *testing.T) {
	store, m, _ := redisMiniStore(t)
	ctx := t.Context()
	key := redisTestKey(20)

	rec, err := store.Claim(ctx, key, "tok", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)
	raw, err := m.Get("idempotency:" + key)
	require.NoError(t, err)
	assert.Equal(t, "\x02\x01\x03tok", raw, "an in-flight record is the version 2 header alone")

	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "tok",
		Fingerprint: []byte("fp2"), Response: idempotency.Response{StatusCode: http.StatusOK, Body: []byte("ok")}}
	require.NoError(t, store.Complete(ctx, key, "tok", done, time.Hour))
	raw, err = m.Get("idempotency:" + key)
	require.NoError(t, err)
	assert.Equal(t, "\x02\x02\x03tok", raw[:6])
	got, err := store.Get(ctx, key)
	require.NoError(t, err)
	assert.Equal(t, done, got)
}

func TestRedisStoreReadsVersion1Completed(t *testing.T) {
	store, m, _ := redisMiniStore(t)
	ctx := t.Context()
	key := redisTestKey(21)
	require.NoError(t, m.Set("idempotency:"+key, redisVersion1Completed))
	m.SetTTL("idempotency:"+key, time.Hour)

	want := &idempotency.Record{
		State:       idempotency.StateCompleted,
		Token:       "old",
		Fingerprint: []byte("fp1"),
		Response: idempotency.Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Location": {"/o/1"}},
			Body:       []byte("ok"),
		},
	}
	rec, err := store.Claim(ctx, key, "new", time.Minute)
	require.NoError(t, err)
	assert.Equal(t, want, rec, "replayed with the fingerprint as it was written")
	got, err := store.Get(ctx, key)
	require.NoError(t, err)
	assert.Equal(t, want, got)

	require.NoError(t, store.Complete(ctx, key, "old", want, time.Minute), "a re-sent complete is harmless")
	for name, err := range map[string]error{
		"extend":         store.Extend(ctx, key, "old", time.Minute),
		"release":        store.Release(ctx, key, "old"),
		"complete other": store.Complete(ctx, key, "new", want, time.Minute),
	} {
		assert.ErrorIs(t, err, idempotency.ErrNotOwner, name)
	}
	raw, err := m.Get("idempotency:" + key)
	require.NoError(t, err)
	assert.Equal(t, redisVersion1Completed, raw, "left as it was")
	assert.Equal(t, time.Hour, m.TTL("idempotency:"+key))
}

func TestRedisStoreReadsVersion1InFlight(t *testing.T) {
	const v1 = "\x01\x01\x03old"
	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "old",
		Response: idempotency.Response{StatusCode: http.StatusCreated, Body: []byte("created")}}
	tests := []struct {
		name string
		// run acts as the owner of the version 1 claim would, after an
		// upgrade, and returns the value it expects under the key ("" for
		// none).
		run func(t *testing.T, store *idempotency.RedisStore, key string) string
	}{
		{"conflict", func(t *testing.T, store *idempotency.RedisStore, key string) string {
			rec, err := store.Claim(t.Context(), key, "new", time.Minute)
			require.NoError(t, err)
			assert.Equal(t, &idempotency.Record{State: idempotency.StateInFlight, Token: "old", LeaseRemaining: 30 * time.Second}, rec)
			return v1
		}},
		{"claim re-sent", func(t *testing.T, store *idempotency.RedisStore, key string) string {
			rec, err := store.Claim(t.Context(), key, "old", time.Minute)
			require.NoError(t, err)
			assert.Nil(t, rec, "the owner's token still holds the key")
			return "\x02\x01\x03old"
		}},
		{"extend", func(t *testing.T, store *idempotency.RedisStore, key string) string {
			require.NoError(t, store.Extend(t.Context(), key, "old", time.Minute))
			assert.ErrorIs(t, store.Extend(t.Context(), key, "new", time.Minute), idempotency.ErrNotOwner)
			return v1
		}},
		{"complete", func(t *testing.T, store *idempotency.RedisStore, key string) string {
			assert.ErrorIs(t, store.Complete(t.Context(), key, "new", done, time.Hour), idempotency.ErrNotOwner)
			require.NoError(t, store.Complete(t.Context(), key, "old", done, time.Hour))
			got, err := store.Get(t.Context(), key)
			require.NoError(t, err)
			assert.Equal(t, done, got)
			return "\x02\x02\x03old\xc9\x01\x00\x00\x00\x00\x07created"
		}},
		{"release", func(t *testing.T, store *idempotency.RedisStore, key string) string {
			assert.ErrorIs(t, store.Release(t.Context(), key, "new"), idempotency.ErrNotOwner)
			require.NoError(t, store.Release(t.Context(), key, "old"))
			return ""
		}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store, m, _ := redisMiniStore(t)
			key := redisTestKey(30 + i)
			require.NoError(t, m.Set("idempotency:"+key, v1))
			m.SetTTL("idempotency:"+key, 30*time.Second)

			want := tt.run(t, store, key)
			if want == "" {
				assert.False(t, m.Exists("idempotency:"+key))
				return
			}
			raw, err := m.Get("idempotency:" + key)
			require.NoError(t, err)
			assert.Equal(t, want, raw)
		})
	}
}

func TestRedisStoreTokenTooLong(t *testing.T) {
	store, m, _ := redisMiniStore(t)
	_, err := store.Claim(t.Context(), redisTestKey(6), strings.Repeat("x", 256), time.Minute)
	require.Error(t, err)
	assert.Empty(t, m.Keys())
}

func TestRedisStoreRacingClaims(t *testing.T) {
	store, _, _ := redisMiniStore(t)
	key := redisTestKey(7)
	const n = 50
	var winners atomic.Int32
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			rec, err := store.Claim(context.Background(), key, fmt.Sprintf("tok-%d", i), time.Minute)
			if assert.NoError(t, err) && rec == nil {
				winners.Add(1)
			}
		})
	}
	wg.Wait()
	assert.Equal(t, int32(1), winners.Load())
}

// redisCountingHook counts the commands and pipelines a client sends and
// keeps the arguments of each script run, alone or in a pipeline.
type redisCountingHook struct {
	mu        sync.Mutex
	commands  int
	pipelines int
	evals     [][]any
}

func (h *redisCountingHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *redisCountingHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.mu.Lock()
		h.commands++
		if name := cmd.Name(); name == "evalsha" || name == "eval" {
			h.evals = append(h.evals, cmd.Args())
		}
		h.mu.Unlock()
		return next(ctx, cmd)
	}
}

func (h *redisCountingHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.mu.Lock()
		h.pipelines++
		for _, cmd := range cmds {
			if name := cmd.Name(); name == "evalsha" || name == "eval" {
				h.evals = append(h.evals, cmd.Args())
			}
		}
		h.mu.Unlock()
		return next(ctx, cmds)
	}
}

func (h *redisCountingHook) total() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.commands + h.pipelines
}

// evalCount returns how many EVAL (not EVALSHA) commands were sent.
func (h *redisCountingHook) evalCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, args := range h.evals {
		if args[0] == "eval" {
			n++
		}
	}
	return n
}

func (h *redisCountingHook) reset() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.commands, h.pipelines, h.evals = 0, 0, nil
}

// redisExerciseStore runs every Store operation once on key.
func redisExerciseStore(t *testing.T, store idempotency.Store, key string) {
	t.Helper()
	ctx := t.Context()
	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "a",
		Response: idempotency.Response{StatusCode: 200, Body: []byte("ok")}}
	_, err := store.Claim(ctx, key, "a", time.Minute)
	require.NoError(t, err)
	require.NoError(t, store.Extend(ctx, key, "a", time.Minute))
	require.NoError(t, store.Release(ctx, key, "a"))
	_, err = store.Claim(ctx, key, "a", time.Minute)
	require.NoError(t, err)
	require.NoError(t, store.Complete(ctx, key, "a", done, time.Hour))
	_, err = store.Get(ctx, key)
	require.NoError(t, err)
	require.NoError(t, store.Delete(ctx, key))
}

func TestRedisStoreOneRoundTripPerOperation(t *testing.T) {
	store, _, client := redisMiniStore(t)
	counter := &redisCountingHook{}
	client.AddHook(counter)
	ctx := t.Context()
	key := redisTestKey(8)

	// Warm up: the first run of each script falls back from EVALSHA to EVAL,
	// which caches it on the server.
	redisExerciseStore(t, store, key)
	require.Equal(t, 5, counter.evalCount(), "each of the five scripts fell back to EVAL once")

	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "a",
		Response: idempotency.Response{StatusCode: 201, Body: []byte("created")}}
	steps := []struct {
		name string
		op   func() error
	}{
		{"claim", func() error { _, err := store.Claim(ctx, key, "a", time.Minute); return err }},
		{"claim re-sent", func() error { _, err := store.Claim(ctx, key, "a", time.Minute); return err }},
		{"conflict", func() error { _, err := store.Claim(ctx, key, "b", time.Minute); return err }},
		{"extend", func() error { return store.Extend(ctx, key, "a", time.Minute) }},
		{"complete", func() error { return store.Complete(ctx, key, "a", done, time.Hour) }},
		{"replay", func() error { _, err := store.Claim(ctx, key, "b", time.Minute); return err }},
		{"get", func() error { _, err := store.Get(ctx, key); return err }},
		{"delete", func() error { return store.Delete(ctx, key) }},
		{"claim again", func() error { _, err := store.Claim(ctx, key, "a", time.Minute); return err }},
		{"release", func() error { return store.Release(ctx, key, "a") }},
	}
	for _, step := range steps {
		counter.reset()
		require.NoError(t, step.op(), step.name)
		assert.Equal(t, 1, counter.total(), "%s: one round trip", step.name)
	}

	// A request's life: first execution 2, replay 1, conflict 1.
	flows := []struct {
		name  string
		trips int
		run   func(key string)
	}{
		{"first execution", 2, func(key string) {
			rec, err := store.Claim(ctx, key, "a", time.Minute)
			require.NoError(t, err)
			require.Nil(t, rec)
			require.NoError(t, store.Complete(ctx, key, "a", done, time.Hour))
		}},
		{"replay", 1, func(key string) {
			rec, err := store.Claim(ctx, key, "b", time.Minute)
			require.NoError(t, err)
			require.Equal(t, idempotency.StateCompleted, rec.State)
		}},
	}
	key = redisTestKey(9)
	for _, flow := range flows {
		counter.reset()
		flow.run(key)
		assert.Equal(t, flow.trips, counter.total(), flow.name)
	}
	_, err := store.Claim(ctx, redisTestKey(10), "a", time.Minute)
	require.NoError(t, err)
	counter.reset()
	rec, err := store.Claim(ctx, redisTestKey(10), "b", time.Minute)
	require.NoError(t, err)
	require.Equal(t, idempotency.StateInFlight, rec.State)
	assert.Equal(t, 1, counter.total(), "conflict")
}

func TestRedisStoreScriptsFlushed(t *testing.T) {
	store, m, client := redisMiniStore(t)
	redisExerciseStore(t, store, redisTestKey(11))

	m.FlushAll() // drops keys only; the script cache is a separate thing
	require.NoError(t, client.ScriptFlush(t.Context()).Err())
	redisExerciseStore(t, store, redisTestKey(11))
}

func TestRedisStoreScriptsTouchOneKey(t *testing.T) {
	store, _, client := redisMiniStore(t, idempotency.WithKeyPrefix("p:"))
	counter := &redisCountingHook{}
	client.AddHook(counter)
	key := redisTestKey(12)

	redisExerciseStore(t, store, key)
	redisExerciseStore(t, store, key)

	require.NotEmpty(t, counter.evals)
	for _, args := range counter.evals {
		// EVAL(SHA) script numkeys key [arg ...]
		require.GreaterOrEqual(t, len(args), 4)
		assert.EqualValues(t, 1, args[2], "one key per script")
		assert.Equal(t, "p:"+key, args[3])
	}

	keysRef := regexp.MustCompile(`KEYS\s*\[\s*([^\]]*)\]`)
	files := []string{"redis_record.lua", "redis_claim.lua", "redis_extend.lua",
		"redis_complete.lua", "redis_release.lua", "redis_get.lua"}
	for _, name := range files {
		src, err := os.ReadFile(name)
		require.NoError(t, err)
		refs := keysRef.FindAllStringSubmatch(string(src), -1)
		for _, ref := range refs {
			assert.Equal(t, "1", ref[1], "%s: only KEYS[1]", name)
		}
		assert.NotContains(t, string(src), "#KEYS", name)
	}
}

// redisResendHook sends every command twice, as go-redis does when it
// retries a command whose first reply was lost, and keeps the second reply.
type redisResendHook struct{}

func (redisResendHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (redisResendHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if name := cmd.Name(); name == "evalsha" || name == "eval" {
			_ = next(ctx, cmd)
		}
		return next(ctx, cmd)
	}
}

func (redisResendHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func TestRedisStoreResentCommands(t *testing.T) {
	store, _, client := redisMiniStore(t)
	ctx := t.Context()
	key := redisTestKey(13)
	redisExerciseStore(t, store, key) // load the scripts, so EVALSHA runs each once per send
	client.AddHook(redisResendHook{})

	rec, err := store.Claim(ctx, key, "a", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, rec, "a re-sent claim finds its own token and holds the key")

	require.NoError(t, store.Extend(ctx, key, "a", time.Minute), "a re-sent extend is harmless")

	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "a",
		Response: idempotency.Response{StatusCode: 201, Body: []byte("created")}}
	require.NoError(t, store.Complete(ctx, key, "a", done, time.Hour), "a re-sent complete is harmless")

	rec, err = store.Claim(ctx, key, "b", time.Minute)
	require.NoError(t, err)
	assert.Equal(t, done, rec)
}
