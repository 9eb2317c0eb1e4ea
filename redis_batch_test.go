package idempotency

import (
	"context"
	"errors"
	"fmt"
	"runtime"
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
// that the claims made meanwhile find every lane busy, and counts the
// pipelines of scripts. beforePipeline, when set, runs before each such
// pipeline goes out; goexit and panics make one end badly.
type redisGateHook struct {
	first          atomic.Bool
	held           chan struct{} // closed when the first script run is held
	release        chan struct{}
	pipelines      atomic.Int32
	beforePipeline func()
	panics         atomic.Bool
	goexit         atomic.Bool
	refuse         error // returned for such a pipeline, which is not sent
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
		switch {
		case h.panics.Load():
			panic("hook failure")
		case h.goexit.Load():
			runtime.Goexit()
		}
		if h.beforePipeline != nil {
			h.beforePipeline()
		}
		if h.refuse != nil {
			return h.refuse // as a circuit breaker would, sending nothing
		}
		return next(ctx, cmds)
	}
}

// redisBatchStore returns a store on a fresh miniredis with the gate hook,
// its claim script loaded.
func redisBatchStore(t *testing.T, opts ...RedisOption) (*RedisStore, *redis.Client, *redisGateHook) {
	t.Helper()
	m := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	store := NewRedisStore(client, opts...)
	require.NoError(t, redisClaimScript.Load(t.Context(), client).Err())
	hook := newRedisGateHook()
	client.AddHook(hook)
	return store, client, hook
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

// redisHoldFirst starts a claim of key "first" and returns once it is held
// by the gate, with a channel for its error.
func redisHoldFirst(t *testing.T, store *RedisStore, hook *redisGateHook) <-chan error {
	t.Helper()
	first := make(chan error, 1)
	go func() {
		_, err := store.Claim(context.Background(), "first", "t-first", time.Minute)
		first <- err
	}()
	<-hook.held
	return first
}

// redisBatchClaim is the outcome of one claim.
type redisBatchClaim struct {
	key, token string
	rec        *Record
	err        error
}

func TestRedisClaimsQueuedWhileEveryLaneIsBusy(t *testing.T) {
	// With one lane held, 10 claims of distinct keys and 10 of one shared
	// key queue up. They go out as one pipeline, and each gets its own
	// reply: every distinct key is claimed, exactly one claim of the
	// shared key wins, and the others see it in flight.
	store, _, hook := redisBatchStore(t, WithClaimBatching(1))
	ctx := t.Context()
	first := redisHoldFirst(t, store, hook)

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

	// The lane is free again: a lone claim goes alone.
	require.Eventually(t, func() bool {
		store.claims.mu.Lock()
		defer store.claims.mu.Unlock()
		return store.claims.out == 0
	}, 5*time.Second, time.Millisecond)
	rec, err := store.Claim(ctx, "alone", "t", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)
	assert.EqualValues(t, 1, hook.pipelines.Load())
}

func TestRedisClaimLanesPassAStuckClaim(t *testing.T) {
	// With two lanes, a claim that hangs holds one: the claims after it
	// still get through, alone or batched on the other lane.
	store, _, hook := redisBatchStore(t, WithClaimBatching(2))
	ctx := t.Context()
	first := redisHoldFirst(t, store, hook)
	for i := range 5 {
		rec, err := store.Claim(ctx, fmt.Sprintf("k%d", i), "t", time.Minute)
		require.NoError(t, err, "claim %d", i)
		require.Nil(t, rec)
	}
	close(hook.release)
	require.NoError(t, <-first)
}

func TestRedisClaimsAloneWithoutBatching(t *testing.T) {
	// By default every claim is sent alone: one that hangs holds up no
	// other, and no pipeline is sent.
	store, _, hook := redisBatchStore(t)
	ctx := t.Context()
	first := redisHoldFirst(t, store, hook)
	for i := range 3 {
		rec, err := store.Claim(ctx, fmt.Sprintf("k%d", i), "t", time.Minute)
		require.NoError(t, err)
		require.Nil(t, rec)
	}
	close(hook.release)
	require.NoError(t, <-first)
	assert.Zero(t, hook.pipelines.Load())
	assert.PanicsWithValue(t, "idempotency: WithClaimBatching needs a positive number of lanes",
		func() { WithClaimBatching(0) })
}

func TestRedisClaimAbandonedInQueueIsNotSent(t *testing.T) {
	// A claim whose context ends while it waits returns at once, and is
	// left out of the batch: its key stays free.
	store, _, hook := redisBatchStore(t, WithClaimBatching(1))
	ctx := t.Context()
	first := redisHoldFirst(t, store, hook)

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
	require.NoError(t, <-first)
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
	// The server forgets the script just as a batch goes out: its claims
	// are refused with NOSCRIPT, so none was applied. The script is loaded
	// again and the claims sent again as one pipeline, except the one
	// whose caller gave up meanwhile, which stays unsent.
	store, client, hook := redisBatchStore(t, WithClaimBatching(1))
	ctx := t.Context()
	gone, cancel := context.WithCancel(ctx)
	abandoned := make(chan error, 1)
	var flushed atomic.Bool
	var abandonedErr error
	hook.beforePipeline = func() {
		if !flushed.CompareAndSwap(false, true) {
			return
		}
		// The batch is on its way: its caller gives up now, and the
		// server forgets the script.
		cancel()
		abandonedErr = <-abandoned
		if err := client.ScriptFlush(context.Background()).Err(); err != nil {
			panic(err)
		}
	}
	first := redisHoldFirst(t, store, hook)

	go func() {
		_, err := store.Claim(gone, "abandoned", "t", time.Minute)
		abandoned <- err
	}()
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
	redisQueued(t, store, 6)
	close(hook.release)
	require.NoError(t, <-first)
	for range 5 {
		require.NoError(t, <-errs)
	}
	require.ErrorIs(t, abandonedErr, context.Canceled)
	assert.EqualValues(t, 2, hook.pipelines.Load(), "the batch, then its claims again")
	rec, err := store.Get(ctx, "abandoned")
	require.NoError(t, err)
	assert.Nil(t, rec, "a claim given up is not sent again")
}

func TestRedisClaimsBatchEndingBadly(t *testing.T) {
	// A client hook that panics, or stops its goroutine, while a batch is
	// out fails the claims of that batch, not the process, and frees the
	// lane for the claims after it.
	for _, how := range []string{"panic", "goexit"} {
		t.Run(how, func(t *testing.T) {
			store, _, hook := redisBatchStore(t, WithClaimBatching(1))
			ctx := t.Context()
			if how == "panic" {
				hook.panics.Store(true)
			} else {
				hook.goexit.Store(true)
			}
			for _, err := range redisBatchOfThree(t, store, hook) {
				require.Error(t, err)
				if how == "panic" {
					assert.Contains(t, err.Error(), "panic in the redis client: hook failure")
				} else {
					assert.ErrorIs(t, err, errRedisBatchEnded)
				}
			}
			hook.panics.Store(false)
			hook.goexit.Store(false)
			require.Eventually(t, func() bool {
				store.claims.mu.Lock()
				defer store.claims.mu.Unlock()
				return store.claims.out == 0
			}, 5*time.Second, time.Millisecond, "the lane is free")
			rec, err := store.Claim(ctx, "after", "t", time.Minute)
			require.NoError(t, err)
			assert.Nil(t, rec)
		})
	}
}

func TestRedisClaimsBatchRefusedByAHook(t *testing.T) {
	// A pipeline hook that refuses the batch without sending it, as a
	// circuit breaker does: its callers get the hook's error.
	store, _, hook := redisBatchStore(t, WithClaimBatching(1))
	errOpen := errors.New("breaker open")
	hook.refuse = errOpen
	for _, err := range redisBatchOfThree(t, store, hook) {
		assert.ErrorIs(t, err, errOpen)
	}
}

// redisBatchOfThree holds a claim, queues three behind it, lets them all go
// and returns the errors of the three, which went out as one batch.
func redisBatchOfThree(t *testing.T, store *RedisStore, hook *redisGateHook) []error {
	t.Helper()
	first := redisHoldFirst(t, store, hook)
	errs := make(chan error, 3)
	for i := range 3 {
		go func() {
			_, err := store.Claim(t.Context(), fmt.Sprintf("k%d", i), "t", time.Minute)
			errs <- err
		}()
	}
	redisQueued(t, store, 3)
	close(hook.release)
	require.NoError(t, <-first)
	return []error{<-errs, <-errs, <-errs}
}
