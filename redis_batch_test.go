package idempotency

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// redisGateHook holds the first script run until release is closed, so
// that the claims sent meanwhile queue up, and counts the pipelines of
// scripts. It may be told to panic on such a pipeline.
type redisGateHook struct {
	first     atomic.Bool
	held      chan struct{} // closed when the first script run is held
	release   chan struct{}
	pipelines atomic.Int32
	panics    atomic.Bool
}

func newRedisGateHook() *redisGateHook {
	return &redisGateHook{held: make(chan struct{}), release: make(chan struct{})}
}

func (h *redisGateHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *redisGateHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if name := cmd.Name(); (name == "evalsha" || name == "eval") && h.first.CompareAndSwap(false, true) {
			close(h.held)
			<-h.release
		}
		return next(ctx, cmd)
	}
}

func (h *redisGateHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if len(cmds) == 0 || cmds[0].Name() != "evalsha" {
			return next(ctx, cmds) // a connection's handshake, say
		}
		h.pipelines.Add(1)
		if h.panics.Load() {
			panic("hook failure")
		}
		return next(ctx, cmds)
	}
}

// redisBatchStore returns a store on a fresh miniredis with the gate hook,
// its scripts loaded.
func redisBatchStore(t *testing.T) (*RedisStore, *miniredis.Miniredis, *redis.Client, *redisGateHook) {
	t.Helper()
	m := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	store := NewRedisStore(client)
	require.NoError(t, redisClaimScript.Load(t.Context(), client).Err())
	hook := newRedisGateHook()
	client.AddHook(hook)
	return store, m, client, hook
}

// redisQueued waits until n claims wait in store's queue.
func redisQueued(t *testing.T, store *RedisStore, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		store.claims.mu.Lock()
		defer store.claims.mu.Unlock()
		return len(store.claims.queue) == n
	}, 5*time.Second, time.Millisecond)
}

// redisBatchClaim is the outcome of one claim.
type redisBatchClaim struct {
	key, token string
	rec        *Record
	err        error
}

func TestRedisClaimsQueuedWhileOneIsOut(t *testing.T) {
	// While the first claim is held on its way, 10 claims of distinct keys
	// and 10 of one shared key queue up. They go out as one pipeline, and
	// each gets its own reply: every distinct key is claimed, exactly one
	// claim of the shared key wins, and the others see it in flight.
	store, _, _, hook := redisBatchStore(t)
	ctx := t.Context()
	first := make(chan error, 1)
	go func() {
		_, err := store.Claim(ctx, "first", "t-first", time.Minute)
		first <- err
	}()
	<-hook.held

	results := make(chan redisBatchClaim, 20)
	var wg sync.WaitGroup
	for i := range 20 {
		key, token := fmt.Sprintf("distinct-%d", i), fmt.Sprintf("t-%d", i)
		if i >= 10 {
			key = "shared"
		}
		wg.Go(func() {
			rec, err := store.Claim(ctx, key, token, time.Minute)
			results <- redisBatchClaim{key, token, rec, err}
		})
	}
	redisQueued(t, store, 20)
	close(hook.release)
	require.NoError(t, <-first)
	wg.Wait()
	close(results)

	winners := map[string]string{}
	var losers []redisBatchClaim
	for r := range results {
		require.NoError(t, r.err)
		if r.rec == nil {
			_, twice := winners[r.key]
			require.False(t, twice, "key %s claimed twice", r.key)
			winners[r.key] = r.token
			continue
		}
		losers = append(losers, r)
	}
	require.Len(t, winners, 11, "each distinct key and the shared one")
	require.Len(t, losers, 9)
	for _, r := range losers {
		assert.Equal(t, "shared", r.key)
		assert.Equal(t, StateInFlight, r.rec.State)
		assert.Equal(t, winners["shared"], r.rec.Token, "the loser sees the winner")
		assert.Positive(t, r.rec.LeaseRemaining)
	}
	for key, token := range winners {
		rec, err := store.Get(ctx, key)
		require.NoError(t, err)
		require.NotNil(t, rec, key)
		assert.Equal(t, token, rec.Token, key)
	}
	assert.EqualValues(t, 1, hook.pipelines.Load(), "the queue went out as one pipeline")

	// The queue is empty and the batcher idle: a lone claim goes alone.
	pipelines := hook.pipelines.Load()
	rec, err := store.Claim(ctx, "alone", "t", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)
	assert.Equal(t, pipelines, hook.pipelines.Load())
}

func TestRedisClaimAbandonedInQueueIsNotSent(t *testing.T) {
	// A claim whose context ends while it waits in the queue returns at
	// once, and is left out of the batch: the key stays free.
	store, _, _, hook := redisBatchStore(t)
	ctx := t.Context()
	go func() { _, _ = store.Claim(ctx, "first", "t", time.Minute) }()
	<-hook.held

	gone, cancel := context.WithCancel(ctx)
	abandoned := make(chan error, 1)
	go func() {
		_, err := store.Claim(gone, "abandoned", "t", time.Minute)
		abandoned <- err
	}()
	kept := make(chan error, 1)
	go func() {
		_, err := store.Claim(ctx, "kept", "t", time.Minute)
		kept <- err
	}()
	redisQueued(t, store, 2)
	cancel()
	require.ErrorIs(t, <-abandoned, context.Canceled)
	close(hook.release)
	require.NoError(t, <-kept)

	rec, err := store.Get(ctx, "abandoned")
	require.NoError(t, err)
	assert.Nil(t, rec, "the abandoned claim was not sent")
	rec, err = store.Get(ctx, "kept")
	require.NoError(t, err)
	assert.NotNil(t, rec)

	// A claim whose context has already ended is not sent either.
	_, err = store.Claim(gone, "late", "t", time.Minute)
	require.ErrorIs(t, err, context.Canceled)
	rec, err = store.Get(ctx, "late")
	require.NoError(t, err)
	assert.Nil(t, rec)
}

func TestRedisClaimsBatchAfterScriptFlush(t *testing.T) {
	// The server forgot the script (a restart, SCRIPT FLUSH) while claims
	// queued: the batch's EVALSHA fails with NOSCRIPT, and each claim is
	// sent again alone, which loads it.
	store, _, client, hook := redisBatchStore(t)
	ctx := t.Context()
	go func() { _, _ = store.Claim(ctx, "first", "t", time.Minute) }()
	<-hook.held
	errs := make(chan error, 5)
	for i := range 5 {
		go func() {
			rec, err := store.Claim(ctx, fmt.Sprintf("k%d", i), "t", time.Minute)
			if err == nil && rec != nil {
				err = fmt.Errorf("claim %d found %+v", i, rec)
			}
			errs <- err
		}()
	}
	redisQueued(t, store, 5)
	require.NoError(t, client.ScriptFlush(ctx).Err())
	close(hook.release)
	for range 5 {
		require.NoError(t, <-errs)
	}
	assert.EqualValues(t, 1, hook.pipelines.Load())
}

func TestRedisClaimsPanickingHookFailsTheBatch(t *testing.T) {
	// A client hook that panics in the batch's goroutine fails the claims
	// of that batch instead of the process, and the store goes on.
	store, _, _, hook := redisBatchStore(t)
	ctx := t.Context()
	hook.panics.Store(true)
	go func() { _, _ = store.Claim(ctx, "first", "t", time.Minute) }()
	<-hook.held
	errs := make(chan error, 3)
	for i := range 3 {
		go func() {
			_, err := store.Claim(ctx, fmt.Sprintf("k%d", i), "t", time.Minute)
			errs <- err
		}()
	}
	redisQueued(t, store, 3)
	close(hook.release)
	for range 3 {
		err := <-errs
		require.Error(t, err)
		assert.Contains(t, err.Error(), "panic in the redis client: hook failure")
	}
	hook.panics.Store(false)
	require.Eventually(t, func() bool {
		store.claims.mu.Lock()
		defer store.claims.mu.Unlock()
		return !store.claims.busy
	}, 5*time.Second, time.Millisecond, "the batcher went idle")
	rec, err := store.Claim(ctx, "after", "t", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, rec)
}
