package idempotency_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/storetest"
)

const (
	redisAddrEnv    = "IDEMPOTENCY_REDIS_ADDR"
	redisClusterEnv = "IDEMPOTENCY_REDIS_CLUSTER_ADDRS"
)

// redisRealClient returns a client for the Redis named by
// IDEMPOTENCY_REDIS_ADDR. It skips the test when the variable is unset and
// fails it when the server does not answer.
func redisRealClient(t *testing.T) *redis.Client {
	t.Helper()
	addr := os.Getenv(redisAddrEnv)
	if addr == "" {
		t.Skip("set " + redisAddrEnv + "=host:port to run tests against a real Redis")
	}
	client := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	redisRequirePing(t, client, redisAddrEnv+"="+addr)
	return client
}

// redisRealClusterClient returns a client for the Redis Cluster whose seed
// addresses IDEMPOTENCY_REDIS_CLUSTER_ADDRS lists, comma-separated. It skips
// the test when the variable is unset and fails it when the cluster does not
// answer.
func redisRealClusterClient(t *testing.T) *redis.ClusterClient {
	t.Helper()
	addrs := os.Getenv(redisClusterEnv)
	if addrs == "" {
		t.Skip("set " + redisClusterEnv + "=host:port,host:port,... to run tests against a real Redis Cluster")
	}
	client := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs:                 strings.Split(addrs, ","),
		ContextTimeoutEnabled: true,
	})
	t.Cleanup(func() { _ = client.Close() })
	redisRequirePing(t, client, redisClusterEnv+"="+addrs)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	state, err := client.ClusterInfo(ctx).Result()
	require.NoError(t, err, "%s is set but CLUSTER INFO failed", redisClusterEnv)
	require.Contains(t, state, "cluster_state:ok", "%s is set but the cluster is not ok", redisClusterEnv)
	return client
}

func redisRequirePing(t *testing.T, client redis.UniversalClient, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := client.Ping(ctx).Err(); err != nil {
		t.Fatalf("%s is set but Redis does not answer: %v", what, err)
	}
}

// redisRandomPrefix returns a key prefix no other test run uses, and
// deletes every key under it when the test ends (on every master of a
// cluster). It never flushes a database: the Redis may be shared.
func redisRandomPrefix(t *testing.T, client redis.UniversalClient) string {
	t.Helper()
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	prefix := "idempotency-test:" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		clean := func(ctx context.Context, c *redis.Client) error {
			iter := c.Scan(ctx, 0, prefix+"*", 100).Iterator()
			for iter.Next(ctx) {
				if err := c.Del(ctx, iter.Val()).Err(); err != nil {
					return err
				}
			}
			return iter.Err()
		}
		var err error
		switch c := client.(type) {
		case *redis.ClusterClient:
			err = c.ForEachMaster(ctx, clean)
		case *redis.Client:
			err = clean(ctx, c)
		}
		assert.NoError(t, err, "cleaning up %s*", prefix)
	})
	return prefix
}

// redisRealSuite runs the conformance suite against stores on client, each
// with its own key prefix.
func redisRealSuite(t *testing.T, client redis.UniversalClient) {
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		return idempotency.NewRedisStore(client, idempotency.WithKeyPrefix(redisRandomPrefix(t, client)))
	})
}

func TestRedisStoreRealConformance(t *testing.T) {
	redisRealSuite(t, redisRealClient(t))
}

func TestRedisStoreRealClusterConformance(t *testing.T) {
	redisRealSuite(t, redisRealClusterClient(t))
}

func TestRedisStoreRealClusterSpreadsKeys(t *testing.T) {
	client := redisRealClusterClient(t)
	prefix := redisRandomPrefix(t, client)
	store := idempotency.NewRedisStore(client, idempotency.WithKeyPrefix(prefix))
	ctx := t.Context()

	// Keys land on every master, and each operation works wherever its key
	// lives, with no hash tags.
	for i := range 64 {
		key := redisTestKey(i)
		rec, err := store.Claim(ctx, key, "a", time.Minute)
		require.NoError(t, err)
		require.Nil(t, rec)
		require.NoError(t, store.Complete(ctx, key, "a", &idempotency.Record{
			State: idempotency.StateCompleted, Token: "a",
			Response: idempotency.Response{StatusCode: 200, Body: []byte(key)},
		}, time.Minute))
		rec, err = store.Claim(ctx, key, "b", time.Minute)
		require.NoError(t, err)
		require.NotNil(t, rec)
		assert.Equal(t, []byte(key), rec.Response.Body)
	}
	var mu sync.Mutex
	var perMaster []int64
	err := client.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
		keys, err := c.Keys(ctx, prefix+"*").Result()
		mu.Lock()
		perMaster = append(perMaster, int64(len(keys)))
		mu.Unlock()
		return err
	})
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(perMaster), 3, "a cluster of at least three masters")
	for _, n := range perMaster {
		assert.Positive(t, n, "every master holds some records: %v", perMaster)
	}
}

// redisServerBinary returns the path of redis-server, skipping the test when
// it is not installed and no real Redis was asked for. When
// IDEMPOTENCY_REDIS_ADDR is set (as in CI), a missing redis-server fails the
// test instead, so that CI never skips it silently.
func redisServerBinary(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv(redisAddrEnv) != "" {
			t.Fatalf("%s is set but redis-server is not installed: %v", redisAddrEnv, err)
		}
		t.Skip("redis-server is not installed; install it or set " + redisAddrEnv + " to run the outage test")
	}
	return path
}

// redisFreePort returns a loopback TCP port that was free a moment ago.
func redisFreePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := ln.Addr().(*net.TCPAddr).Port
	require.NoError(t, ln.Close())
	return port
}

// redisStartServer starts a private, non-persistent redis-server on
// 127.0.0.1:port and waits until it answers. The returned function stops
// it; cleanup stops it too if the test did not.
func redisStartServer(t *testing.T, binary string, port int) (stop func()) {
	t.Helper()
	cmd := exec.Command(binary,
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", t.TempDir())
	require.NoError(t, cmd.Start())
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
	}
	t.Cleanup(stop)

	probe := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(port), MaxRetries: -1})
	defer probe.Close()
	require.Eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		return probe.Ping(ctx).Err() == nil
	}, 10*time.Second, 20*time.Millisecond, "redis-server on port %d did not start", port)
	return stop
}

func TestRedisStoreOutage(t *testing.T) {
	binary := redisServerBinary(t)
	port := redisFreePort(t)
	stop := redisStartServer(t, binary, port)

	// The options the README recommends: defaults, plus context deadlines.
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(port), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	store := idempotency.NewRedisStore(client)

	const timeout = 500 * time.Millisecond
	claim := func(key string) (*idempotency.Record, error) {
		ctx, cancel := context.WithTimeout(t.Context(), timeout)
		defer cancel()
		return store.Claim(ctx, key, "tok", time.Minute)
	}

	rec, err := claim(redisTestKey(1))
	require.NoError(t, err)
	require.Nil(t, rec)

	stop()
	start := time.Now()
	rec, err = claim(redisTestKey(2))
	elapsed := time.Since(start)
	require.Error(t, err, "Redis is down")
	assert.Nil(t, rec)
	assert.NotErrorIs(t, err, idempotency.ErrCorruptRecord)
	// A generous bound, but below go-redis's 5s ReadTimeout and its retries.
	assert.Less(t, elapsed, 4*time.Second, "the call is bounded by its context")

	redisStartServer(t, binary, port)
	// Same client, same store: the pool drops the dead connections itself.
	rec, err = claim(redisTestKey(3))
	require.NoError(t, err, "service resumes when Redis is back")
	assert.Nil(t, rec)
}

// redisSilentListener accepts connections and reads from them but never
// answers, like a Redis that hangs. It returns its address.
func redisSilentListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
			wg.Go(func() {
				buf := make([]byte, 4096)
				for {
					if _, err := conn.Read(buf); err != nil {
						return
					}
				}
			})
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func TestRedisStoreSilentServer(t *testing.T) {
	addr := redisSilentListener(t)
	// The options the README recommends: defaults, plus context deadlines.
	client := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	store := idempotency.NewRedisStore(client)

	const timeout = 300 * time.Millisecond
	done := &idempotency.Record{State: idempotency.StateCompleted, Token: "tok",
		Response: idempotency.Response{StatusCode: 200}}
	ops := map[string]func(ctx context.Context) error{
		"claim": func(ctx context.Context) error {
			_, err := store.Claim(ctx, redisTestKey(1), "tok", time.Minute)
			return err
		},
		"extend":   func(ctx context.Context) error { return store.Extend(ctx, redisTestKey(1), "tok", time.Minute) },
		"complete": func(ctx context.Context) error { return store.Complete(ctx, redisTestKey(1), "tok", done, time.Hour) },
		"release":  func(ctx context.Context) error { return store.Release(ctx, redisTestKey(1), "tok") },
		"get":      func(ctx context.Context) error { _, err := store.Get(ctx, redisTestKey(1)); return err },
		"delete":   func(ctx context.Context) error { return store.Delete(ctx, redisTestKey(1)) },
	}
	for name, op := range ops {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(t.Context(), timeout)
			defer cancel()
			start := time.Now()
			err := op(ctx)
			elapsed := time.Since(start)
			require.Error(t, err)
			assert.True(t, errors.Is(err, context.DeadlineExceeded) || isNetTimeout(err), "a timeout: %v", err)
			// Generous, but below go-redis's 5s ReadTimeout.
			assert.Less(t, elapsed, 4*time.Second, "the call is bounded by its context")
		})
	}
}

// TestRedisStoreSilentServerNeedsContextTimeout documents why the README
// recommends ContextTimeoutEnabled: without it, go-redis does not apply the
// context's deadline to the socket, and a silent server holds the call for
// the client's ReadTimeout, however short the context.
func TestRedisStoreSilentServerNeedsContextTimeout(t *testing.T) {
	addr := redisSilentListener(t)
	const readTimeout = time.Second
	client := redis.NewClient(&redis.Options{Addr: addr, ReadTimeout: readTimeout})
	t.Cleanup(func() { _ = client.Close() })
	store := idempotency.NewRedisStore(client)

	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := store.Claim(ctx, redisTestKey(1), "tok", time.Minute)
	elapsed := time.Since(start)
	require.Error(t, err)
	assert.GreaterOrEqual(t, elapsed, readTimeout, "the socket read ran to ReadTimeout, past the context deadline")
}

func isNetTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
