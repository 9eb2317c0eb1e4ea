package idempotency_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// The tests of WithReplicaAcks: on miniredis, whose WAIT always counts no
// replica; on the real Redis and Redis Cluster of the other real-Redis
// tests, asking for more replicas than they have; and on a Sentinel setup
// with a master and a replica, named by IDEMPOTENCY_REDIS_SENTINEL_ADDRS
// (comma-separated Sentinel addresses) and
// IDEMPOTENCY_REDIS_SENTINEL_MASTER (the monitored master's name), as
// .ci/redis-sentinel.sh prints them.

const (
	redisSentinelEnv       = "IDEMPOTENCY_REDIS_SENTINEL_ADDRS"
	redisSentinelMasterEnv = "IDEMPOTENCY_REDIS_SENTINEL_MASTER"
)

// redisAcksUnreachable is a replica count no test server has: WAIT for it
// always times out short.
const redisAcksUnreachable = 64

func TestRedisReplicaAcksOptionPanics(t *testing.T) {
	assert.PanicsWithValue(t, "idempotency: WithReplicaAcks needs at least 1 replica, not 0", func() {
		idempotency.WithReplicaAcks(0, time.Second)
	})
	assert.PanicsWithValue(t, "idempotency: WithReplicaAcks timeout must be positive", func() {
		idempotency.WithReplicaAcks(1, 0)
	})
	assert.PanicsWithValue(t, "idempotency: WithReplicaAcks timeout must be positive", func() {
		idempotency.WithReplicaAcks(1, -time.Second)
	})

	// A client whose pipelines could go anywhere cannot put the WAIT on
	// the script's connection.
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = client.Close() })
	wrapped := struct{ redis.UniversalClient }{client}
	assert.PanicsWithValue(t,
		"idempotency: WithReplicaAcks needs a *redis.Client, *redis.ClusterClient or *redis.Ring, not struct { redis.UniversalClient }",
		func() { idempotency.NewRedisStore(wrapped, idempotency.WithReplicaAcks(1, time.Second)) })
	assert.NotPanics(t, func() { idempotency.NewRedisStore(wrapped) }, "without the option any client does")
}

// TestRedisReplicaAcksMiniredis runs the store on miniredis, where WAIT
// answers 0: every write is applied and then reported unacknowledged.
func TestRedisReplicaAcksMiniredis(t *testing.T) {
	store, m, client := redisMiniStore(t, idempotency.WithReplicaAcks(1, 10*time.Millisecond))
	plain := idempotency.NewRedisStore(client)
	ctx := t.Context()
	key := redisTestKey(1)
	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "a",
		Response: idempotency.Response{StatusCode: 201, Body: []byte("created")}}

	// A claim short of acknowledgements fails and frees the key.
	_, err := store.Claim(ctx, key, "a", time.Minute)
	require.ErrorIs(t, err, idempotency.ErrReplicaAcks)
	assert.NotErrorIs(t, err, idempotency.ErrCorruptRecord)
	assert.Contains(t, err.Error(), "0 of 1")
	assert.False(t, m.Exists("idempotency:"+key), "the unacknowledged claim was released")

	// Extension and completion: applied on the master, reported short.
	rec, err := plain.Claim(ctx, key, "a", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)
	require.ErrorIs(t, store.Extend(ctx, key, "a", time.Minute), idempotency.ErrReplicaAcks)
	require.ErrorIs(t, store.Complete(ctx, key, "a", done, time.Hour), idempotency.ErrReplicaAcks)
	got, err := plain.Get(ctx, key)
	require.NoError(t, err)
	require.Equal(t, idempotency.StateCompleted, got.State, "the completion was applied")
	// A repeated completion writes too, so it is held to the same count.
	require.ErrorIs(t, store.Complete(ctx, key, "a", done, time.Hour), idempotency.ErrReplicaAcks)

	// The script's reply comes before the count: not the owner is
	// ErrNotOwner, and a claim that finds a record wrote nothing to wait
	// for.
	require.ErrorIs(t, store.Extend(ctx, key, "b", time.Minute), idempotency.ErrNotOwner)
	require.ErrorIs(t, store.Complete(ctx, key, "b", done, time.Hour), idempotency.ErrNotOwner)
	rec, err = store.Claim(ctx, key, "b", time.Minute)
	require.NoError(t, err)
	require.Equal(t, idempotency.StateCompleted, rec.State)
	assert.Equal(t, []byte("created"), rec.Response.Body)

	// Release, Get and Delete do not wait.
	require.NoError(t, store.Delete(ctx, key))
	_, err = plain.Claim(ctx, key, "c", time.Minute)
	require.NoError(t, err)
	require.NoError(t, store.Release(ctx, key, "c"))
}

func TestRedisReplicaAcksMiniredisRoundTrips(t *testing.T) {
	store, _, client := redisMiniStore(t, idempotency.WithReplicaAcks(1, time.Millisecond))
	counter := &redisCountingHook{}
	client.AddHook(counter)
	ctx := t.Context()
	key := redisTestKey(2)

	// The first run of each script on a server meets NOSCRIPT inside the
	// pipeline and redoes the pipeline with EVAL.
	_, err := store.Claim(ctx, key, "a", time.Minute)
	require.ErrorIs(t, err, idempotency.ErrReplicaAcks)
	require.Equal(t, 2, counter.evalCount(), "the claim script, and the release of the claim, fell back to EVAL")
	counter.reset()

	_, err = store.Claim(ctx, key, "a", time.Minute)
	require.ErrorIs(t, err, idempotency.ErrReplicaAcks, "the cached script ran and the count was checked")
	// One pipeline for the claim, one command for the release of the
	// unacknowledged claim.
	assert.Equal(t, 2, counter.total())
	assert.Zero(t, counter.evalCount())

	// After SCRIPT FLUSH the NOSCRIPT reply is caught inside the pipeline
	// again, before the WAIT count is looked at.
	require.NoError(t, client.ScriptFlush(ctx).Err())
	counter.reset()
	_, err = store.Claim(ctx, key, "a", time.Minute)
	require.ErrorIs(t, err, idempotency.ErrReplicaAcks)
	assert.NotContains(t, err.Error(), "NOSCRIPT")
	assert.Equal(t, 2, counter.evalCount(), "the claim pipeline was redone with EVAL (and the release fell back too)")
}

func TestRedisReplicaAcksMiddlewareFailsClosed(t *testing.T) {
	_, _, client := redisMiniStore(t)
	var runs atomic.Int32
	store := idempotency.NewRedisStore(client, idempotency.WithReplicaAcks(1, 10*time.Millisecond))
	srv := httptest.NewServer(idempotency.New(idempotency.Config{Store: store})(redisIntOrders(&runs, "a", nil)))
	t.Cleanup(srv.Close)
	hc := redisIntHTTPClient(t)

	r := redisIntMustPost(t, hc, srv.URL, "k")
	redisIntAssertUnavailable(t, r)
	assert.Zero(t, runs.Load(), "the handler did not run on an unacknowledged claim")
}

func TestRedisReplicaAcksFailOpenStillFailsClosed(t *testing.T) {
	_, _, client := redisMiniStore(t)
	var runs atomic.Int32
	store := idempotency.NewRedisStore(client, idempotency.WithReplicaAcks(1, 10*time.Millisecond))
	srv := httptest.NewServer(idempotency.New(idempotency.Config{Store: store, FailOpen: true})(redisIntOrders(&runs, "a", nil)))
	t.Cleanup(srv.Close)

	r := redisIntMustPost(t, redisIntHTTPClient(t), srv.URL, "k")
	redisIntAssertUnavailable(t, r)
	assert.Zero(t, runs.Load(), "the master was reachable: FailOpen does not apply")
}

// TestRedisReplicaAcksRealTooFew asks the real Redis, as a single server
// and as a one-shard Ring, for more replicas than it has.
func TestRedisReplicaAcksRealTooFew(t *testing.T) {
	client := redisRealClient(t)
	prefix := redisRandomPrefix(t, client)
	ring := redis.NewRing(&redis.RingOptions{
		Addrs:                 map[string]string{"only": client.Options().Addr},
		ContextTimeoutEnabled: true,
	})
	t.Cleanup(func() { _ = ring.Close() })
	for name, c := range map[string]redis.UniversalClient{"client": client, "ring": ring} {
		t.Run(name, func(t *testing.T) {
			store := idempotency.NewRedisStore(c, idempotency.WithKeyPrefix(prefix+name+":"),
				idempotency.WithReplicaAcks(redisAcksUnreachable, 20*time.Millisecond))
			redisAcksAssertTooFew(t, store, 5)
		})
	}
}

// TestRedisReplicaAcksRealClusterTooFew checks that each key's WAIT goes
// to the node that owns the key: a WAIT or a script sent elsewhere would
// come back MOVED, not short of replicas.
func TestRedisReplicaAcksRealClusterTooFew(t *testing.T) {
	client := redisRealClusterClient(t)
	store := idempotency.NewRedisStore(client, idempotency.WithKeyPrefix(redisRandomPrefix(t, client)),
		idempotency.WithReplicaAcks(redisAcksUnreachable, 20*time.Millisecond))
	redisAcksAssertTooFew(t, store, 30)
}

// redisAcksAssertTooFew claims n keys on store, which waits for more
// replicas than there are, and checks each claim failed short and was
// released.
func redisAcksAssertTooFew(t *testing.T, store *idempotency.RedisStore, n int) {
	t.Helper()
	ctx := t.Context()
	for i := range n {
		key := redisTestKey(100 + i)
		_, err := store.Claim(ctx, key, "a", time.Minute)
		require.ErrorIs(t, err, idempotency.ErrReplicaAcks, "key %d", i)
		rec, err := store.Get(ctx, key)
		require.NoError(t, err)
		assert.Nil(t, rec, "key %d: the unacknowledged claim was released", i)
	}
}

// redisSentinelSetup is the Sentinel setup the environment names.
type redisSentinelSetup struct {
	addrs  []string
	master string
}

// redisSentinel returns the Sentinel setup of IDEMPOTENCY_REDIS_SENTINEL_ADDRS
// and IDEMPOTENCY_REDIS_SENTINEL_MASTER, once it has a master with a replica
// in sync. It skips the test when the variable is unset and fails it when
// the setup does not answer or does not become whole.
func redisSentinel(t *testing.T) *redisSentinelSetup {
	t.Helper()
	addrs := os.Getenv(redisSentinelEnv)
	if addrs == "" {
		t.Skip("set " + redisSentinelEnv + "=host:port,... and " + redisSentinelMasterEnv +
			"=name (as .ci/redis-sentinel.sh prints them) to run tests against Redis Sentinel")
	}
	master := os.Getenv(redisSentinelMasterEnv)
	require.NotEmpty(t, master, "%s is set but %s is not", redisSentinelEnv, redisSentinelMasterEnv)
	s := &redisSentinelSetup{addrs: strings.Split(addrs, ","), master: master}
	for _, addr := range s.addrs {
		sc := redis.NewSentinelClient(&redis.Options{Addr: addr})
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, err := sc.GetMasterAddrByName(ctx, master).Result()
		cancel()
		_ = sc.Close()
		require.NoError(t, err, "%s=%s and %s=%s are set but Sentinel %s does not answer for the master",
			redisSentinelEnv, addrs, redisSentinelMasterEnv, master, addr)
	}
	s.waitWhole(t, 30*time.Second)
	return s
}

// client returns a new Sentinel failover client with context deadlines
// applied to the socket.
func (s *redisSentinelSetup) client(t *testing.T, tune func(*redis.FailoverOptions)) *redis.Client {
	t.Helper()
	opt := &redis.FailoverOptions{MasterName: s.master, SentinelAddrs: s.addrs, ContextTimeoutEnabled: true}
	if tune != nil {
		tune(opt)
	}
	client := redis.NewFailoverClient(opt)
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// sentinelCall runs f on the Sentinels in turn until one answers.
func (s *redisSentinelSetup) sentinelCall(ctx context.Context, f func(*redis.SentinelClient) error) error {
	var err error
	for _, addr := range s.addrs {
		sc := redis.NewSentinelClient(&redis.Options{Addr: addr, MaxRetries: -1})
		err = f(sc)
		_ = sc.Close()
		if err == nil || ctx.Err() != nil {
			return err
		}
	}
	return err
}

// masterAddr returns the address of the master as the Sentinels see it.
func (s *redisSentinelSetup) masterAddr(ctx context.Context) (string, error) {
	var addr string
	err := s.sentinelCall(ctx, func(sc *redis.SentinelClient) error {
		hp, err := sc.GetMasterAddrByName(ctx, s.master).Result()
		if err == nil {
			addr = net.JoinHostPort(hp[0], hp[1])
		}
		return err
	})
	return addr, err
}

// whole reports whether every Sentinel names the same master, and that
// master has a replica that is online and in sync; it returns the master
// and the replica.
func (s *redisSentinelSetup) whole(ctx context.Context) (master, replica string, err error) {
	for _, addr := range s.addrs {
		sc := redis.NewSentinelClient(&redis.Options{Addr: addr, MaxRetries: -1})
		hp, err := sc.GetMasterAddrByName(ctx, s.master).Result()
		_ = sc.Close()
		if err != nil {
			return "", "", err
		}
		if m := net.JoinHostPort(hp[0], hp[1]); master == "" {
			master = m
		} else if m != master {
			return "", "", errors.New("the Sentinels disagree on the master")
		}
	}
	info, err := redisNodeInfo(ctx, master, "replication")
	if err != nil {
		return "", "", err
	}
	if info["role"] != "master" {
		return "", "", errors.New(master + " is not a master yet")
	}
	// slave0:ip=127.0.0.1,port=23701,state=online,offset=...,lag=0
	for field := range strings.SplitSeq(info["slave0"], ",") {
		if k, v, _ := strings.Cut(field, "="); k == "port" {
			replica = net.JoinHostPort("127.0.0.1", v)
		}
	}
	if replica == "" || !strings.Contains(info["slave0"], "state=online") {
		return "", "", errors.New(master + " has no replica online")
	}
	rinfo, err := redisNodeInfo(ctx, replica, "replication")
	if err != nil {
		return "", "", err
	}
	if rinfo["master_link_status"] != "up" || net.JoinHostPort(rinfo["master_host"], rinfo["master_port"]) != master {
		return "", "", errors.New(replica + " is not in sync with " + master)
	}
	return master, replica, nil
}

// waitWhole waits until the setup is whole, for at most limit, and
// returns the master and the replica.
func (s *redisSentinelSetup) waitWhole(t *testing.T, limit time.Duration) (master, replica string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		master, replica, err := s.whole(ctx)
		cancel()
		if err == nil {
			return master, replica
		}
		if time.Now().After(deadline) {
			require.NoError(t, err, "the Sentinel setup did not become whole (a master with a replica in sync) in %v", limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// redisNodeInfo returns the fields of one INFO section of the server at
// addr.
func redisNodeInfo(ctx context.Context, addr, section string) (map[string]string, error) {
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
	defer c.Close()
	text, err := c.Info(ctx, section).Result()
	if err != nil {
		return nil, err
	}
	fields := map[string]string{}
	for line := range strings.SplitSeq(text, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			fields[k] = v
		}
	}
	return fields, nil
}

// redisNodePID returns the process id of the server at addr, a loopback
// address, so the test may signal it.
func redisNodePID(t *testing.T, addr string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	info, err := redisNodeInfo(ctx, addr, "server")
	require.NoError(t, err)
	pid, err := strconv.Atoi(info["process_id"])
	require.NoError(t, err, "process_id of %s", addr)
	return pid
}

// redisSentinelBackend is a backend on the master of the Sentinel setup,
// reached through failover clients, whose stores get opts. The test is
// skipped when the setup is not configured.
func redisSentinelBackend(t *testing.T, opts ...idempotency.RedisOption) *redisIntBackend {
	t.Helper()
	s := redisSentinel(t)
	admin := s.client(t, nil)
	return &redisIntBackend{
		prefix:    redisRandomPrefix(t, admin),
		advance:   func(d time.Duration) { time.Sleep(d + 50*time.Millisecond) },
		newClient: func(t *testing.T) *redis.Client { return s.client(t, nil) },
		opts:      opts,
	}
}

func TestRedisReplicaAcksSentinel(t *testing.T) {
	s := redisSentinel(t)
	client := s.client(t, nil)
	counter := &redisCountingHook{}
	client.AddHook(counter)
	prefix := redisRandomPrefix(t, client)
	store := idempotency.NewRedisStore(client, idempotency.WithKeyPrefix(prefix), idempotency.WithReplicaAcks(1, time.Second))
	ctx := t.Context()
	_, replicaAddr := s.waitWhole(t, 30*time.Second)
	replica := redis.NewClient(&redis.Options{Addr: replicaAddr})
	t.Cleanup(func() { _ = replica.Close() })

	// What was acknowledged is on the replica when the call returns.
	key := redisTestKey(1)
	rec, err := store.Claim(ctx, key, "a", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)
	held, err := replica.Get(ctx, prefix+key).Result()
	require.NoError(t, err, "the acknowledged claim is on the replica")
	require.NoError(t, store.Extend(ctx, key, "a", time.Minute))
	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "a",
		Response: idempotency.Response{StatusCode: 201, Body: []byte("created")}}
	require.NoError(t, store.Complete(ctx, key, "a", done, time.Hour))
	completed, err := replica.Get(ctx, prefix+key).Result()
	require.NoError(t, err)
	assert.NotEqual(t, held, completed, "the acknowledged completion is on the replica")
	require.NoError(t, store.Complete(ctx, key, "a", done, time.Hour), "a repeated completion is acknowledged")

	t.Run("NOSCRIPT", func(t *testing.T) {
		master, _ := s.waitWhole(t, 30*time.Second)
		direct := redis.NewClient(&redis.Options{Addr: master})
		t.Cleanup(func() { _ = direct.Close() })
		require.NoError(t, direct.ScriptFlush(ctx).Err())
		counter.reset()
		key := redisTestKey(2)
		rec, err := store.Claim(ctx, key, "a", time.Minute)
		require.NoError(t, err, "NOSCRIPT inside the pipeline is handled")
		require.Nil(t, rec)
		assert.Equal(t, 1, counter.evalCount(), "the pipeline was redone with EVAL")
		assert.Equal(t, 2, counter.total(), "the EVALSHA pipeline and the EVAL one")
		counter.reset()
		require.NoError(t, store.Complete(ctx, key, "a", done, time.Hour))
		rec, err = store.Claim(ctx, key, "b", time.Minute)
		require.NoError(t, err)
		require.Equal(t, idempotency.StateCompleted, rec.State)
		counter.reset()
		rec, err = store.Claim(ctx, key, "b", time.Minute)
		require.NoError(t, err)
		require.Equal(t, idempotency.StateCompleted, rec.State)
		assert.Equal(t, 1, counter.total(), "a replay is one round trip once the script is cached")
		assert.Zero(t, counter.evalCount())
	})

	t.Run("replica paused", func(t *testing.T) {
		const storeTimeout = time.Second
		_, replicaAddr := s.waitWhole(t, 30*time.Second)
		var runs atomic.Int32
		paused := idempotency.NewRedisStore(client, idempotency.WithKeyPrefix(prefix), idempotency.WithReplicaAcks(1, 300*time.Millisecond))
		srv := httptest.NewServer(idempotency.New(idempotency.Config{Store: paused, StoreTimeout: storeTimeout})(redisIntOrders(&runs, "a", nil)))
		t.Cleanup(srv.Close)
		hc := redisIntHTTPClient(t)

		// SIGSTOP: the replica stays connected and acknowledges nothing.
		pid := redisNodePID(t, replicaAddr)
		require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
		resumed := false
		resume := func() {
			if !resumed {
				resumed = true
				assert.NoError(t, syscall.Kill(pid, syscall.SIGCONT))
			}
		}
		t.Cleanup(resume)

		key := redisIntKey(t)
		start := time.Now()
		r := redisIntMustPost(t, hc, srv.URL, key)
		elapsed := time.Since(start)
		resume()
		redisIntAssertUnavailable(t, r)
		assert.Less(t, elapsed, storeTimeout+redisIntSlack, "the 503 came within StoreTimeout")
		assert.Zero(t, runs.Load())

		// The unacknowledged claim was released: the retry runs as soon
		// as the replica is back, without waiting out the lease.
		s.waitWhole(t, 30*time.Second)
		r = redisIntPostUntilServed(t, hc, srv.URL, key)
		assert.Equal(t, http.StatusCreated, r.status)
		assert.Equal(t, int32(1), runs.Load())
	})
}

func TestRedisReplicaAcksTimeoutBelowStoreTimeout(t *testing.T) {
	_, _, client := redisMiniStore(t)
	store := idempotency.NewRedisStore(client, idempotency.WithReplicaAcks(1, 2*time.Second))
	assert.PanicsWithValue(t, "idempotency: the WithReplicaAcks timeout (2s) must be shorter than StoreTimeout (2s)",
		func() { idempotency.New(idempotency.Config{Store: store}) })
	assert.NotPanics(t, func() { idempotency.New(idempotency.Config{Store: store, StoreTimeout: 3 * time.Second}) })
}
