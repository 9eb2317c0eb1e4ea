package idempotency_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
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

// The tests in this file run the middleware, idempotency.New with a
// RedisStore, behind real HTTP servers, against miniredis (always), the
// Redis named by IDEMPOTENCY_REDIS_ADDR (when set), and redis-server
// processes the tests start and stop themselves on free loopback ports.

// redisIntSlack is the generous margin added to a configured timeout when
// checking that a request did not hang. It is an upper bound only: the
// tests never assert that anything is fast.
const redisIntSlack = 3 * time.Second

// redisIntBackend is a Redis the middleware instances of a test share.
type redisIntBackend struct {
	addr   string
	prefix string
	// advance lets d of Redis time pass: FastForward on miniredis, a
	// sleep on a real server.
	advance func(d time.Duration)
	// newClient, when set, makes the clients instead of a plain client of
	// addr (a Sentinel failover client, say).
	newClient func(t *testing.T) *redis.Client
	// opts are added to the options of every instance's RedisStore.
	opts []idempotency.RedisOption
}

// redisIntBackends runs test against miniredis, and against the real Redis
// of IDEMPOTENCY_REDIS_ADDR (skipped with a message when it is unset, failed
// when it does not answer). On the real Redis the keys live under a random
// prefix, deleted by SCAN and DEL when the test ends.
func redisIntBackends(t *testing.T, test func(t *testing.T, b *redisIntBackend)) {
	t.Helper()
	t.Run("miniredis", func(t *testing.T) {
		m := miniredis.RunT(t)
		test(t, &redisIntBackend{addr: m.Addr(), prefix: "idempotency-test:", advance: m.FastForward})
	})
	t.Run("redis", func(t *testing.T) {
		client := redisRealClient(t)
		test(t, &redisIntBackend{
			addr:   client.Options().Addr,
			prefix: redisRandomPrefix(t, client),
			// Redis expires keys with millisecond precision, but only
			// notices on access or in its background cycle: a little
			// margin makes "after" unambiguous.
			advance: func(d time.Duration) { time.Sleep(d + 50*time.Millisecond) },
		})
	})
}

// redisIntLocalBackend is a backend on a redis-server the test started on
// 127.0.0.1:port.
func redisIntLocalBackend(port int) *redisIntBackend {
	return &redisIntBackend{
		addr:    "127.0.0.1:" + strconv.Itoa(port),
		prefix:  "idempotency-test:",
		advance: func(d time.Duration) { time.Sleep(d + 50*time.Millisecond) },
	}
}

// client returns a new go-redis client of b, with the options the README
// recommends: defaults, plus context deadlines applied to the socket.
func (b *redisIntBackend) client(t *testing.T) *redis.Client {
	t.Helper()
	if b.newClient != nil {
		return b.newClient(t)
	}
	client := redis.NewClient(&redis.Options{Addr: b.addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// redisIntInstance is one process of a service: its own go-redis client,
// its own middleware, its own HTTP server.
type redisIntInstance struct {
	client *redis.Client
	hook   *redisCountingHook
	store  *idempotency.RedisStore
	events *redisIntEvents
	url    string
}

// instance starts a middleware instance on b serving h. cfg.Store is set
// to a RedisStore on a new client, passed through wrap when wrap is not
// nil; cfg.Observer is set to the instance's event log.
func (b *redisIntBackend) instance(t *testing.T, cfg idempotency.Config, h http.Handler, wrap func(idempotency.Store) idempotency.Store) *redisIntInstance {
	t.Helper()
	in := &redisIntInstance{client: b.client(t), hook: &redisCountingHook{}, events: &redisIntEvents{}}
	in.client.AddHook(in.hook)
	in.store = idempotency.NewRedisStore(in.client, append([]idempotency.RedisOption{idempotency.WithKeyPrefix(b.prefix)}, b.opts...)...)
	cfg.Store = in.store
	if wrap != nil {
		cfg.Store = wrap(in.store)
	}
	cfg.Observer = in.events.observe
	srv := httptest.NewServer(idempotency.New(cfg)(h))
	t.Cleanup(srv.Close)
	in.url = srv.URL
	return in
}

// redisIntEvents records what the middleware reported to its Observer.
type redisIntEvents = lcEvents

// errs returns the errors reported with outcome o.
func (e *redisIntEvents) errs(o idempotency.Outcome) []error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	for _, ev := range e.all {
		if ev.Outcome == o {
			errs = append(errs, ev.Err)
		}
	}
	return errs
}

// completionErrors counts the store errors reported after a handler ran
// (while completing, renewing or releasing): those carry no status, as
// the client's response is the handler's, not a 503.
func (e *redisIntEvents) completionErrors() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, ev := range e.all {
		if ev.Outcome == idempotency.OutcomeStoreError && ev.Status == 0 {
			n++
		}
	}
	return n
}

// redisIntOrders returns a handler standing for a side effect: it counts
// its runs in runs, calls wait (when not nil) as slow work would, and
// answers 201 with a body naming the instance that ran it.
func redisIntOrders(runs *atomic.Int32, instance string, wait func(r *http.Request)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := runs.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		if wait != nil {
			wait(r)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", "/orders/"+strconv.Itoa(int(n)))
		w.WriteHeader(http.StatusCreated)
		// Small enough for net/http to hold it until the handler chain
		// returns: a client that has the response knows the middleware has
		// completed (or given up on) the key.
		_, _ = fmt.Fprintf(w, `{"order":%d,"created_by":%q}`, n, instance)
	})
}

// redisIntResponse is what a client got back.
type redisIntResponse struct {
	status int
	header http.Header
	body   string
}

func (r redisIntResponse) replayed() bool {
	return r.header.Get(idempotency.ReplayedHeader) == "true"
}

// problemType returns the "type" member of a problem response.
func (r redisIntResponse) problemType() string {
	var p struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal([]byte(r.body), &p)
	return p.Type
}

// redisIntHTTPClient returns an HTTP client that keeps enough idle
// connections for a burst of concurrent requests.
func redisIntHTTPClient(t *testing.T) *http.Client {
	t.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// redisIntPost sends POST url/orders with key and a fixed body. It returns
// an error rather than failing the test, so goroutines may call it.
func redisIntPost(ctx context.Context, hc *http.Client, url, key string) (redisIntResponse, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/orders", strings.NewReader(`{"item":"book"}`))
	if err != nil {
		return redisIntResponse{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := hc.Do(req)
	if err != nil {
		return redisIntResponse{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return redisIntResponse{status: resp.StatusCode, header: resp.Header, body: string(body)}, err
}

// redisIntMustPost is redisIntPost for the test goroutine.
func redisIntMustPost(t *testing.T, hc *http.Client, url, key string) redisIntResponse {
	t.Helper()
	r, err := redisIntPost(t.Context(), hc, url, key)
	require.NoError(t, err)
	return r
}

// redisIntPostUntilServed is redisIntMustPost for a client that retries
// on 503, as Retry-After invites: with the short StoreTimeout of the outage
// tests, a request on a loaded machine may time out through no fault of
// Redis. Any second execution still shows in the handler's run count.
func redisIntPostUntilServed(t *testing.T, hc *http.Client, url, key string) redisIntResponse {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := redisIntMustPost(t, hc, url, key)
		if r.status != http.StatusServiceUnavailable || time.Now().After(deadline) {
			return r
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// redisIntKey returns a client key no other test uses.
func redisIntKey(t *testing.T) string {
	return "key-" + strings.NewReplacer("/", "-", " ", "_").Replace(t.Name()) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
}

// redisIntAssertUnavailable checks a 503 store-unavailable problem with
// Retry-After.
func redisIntAssertUnavailable(t *testing.T, r redisIntResponse) {
	t.Helper()
	assert.Equal(t, http.StatusServiceUnavailable, r.status)
	assert.NotEmpty(t, r.header.Get("Retry-After"), "503 carries Retry-After")
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemStoreUnavailable, r.problemType())
	assert.False(t, r.replayed())
}

func TestRedisIntegrationExactlyOnceAcrossInstances(t *testing.T) {
	redisIntBackends(t, func(t *testing.T, b *redisIntBackend) {
		const (
			instances = 3
			requests  = 200
		)
		var runs atomic.Int32
		// The handler takes a while, so that most duplicates arrive while
		// the first is in flight; the rest arrive after it and replay.
		slow := func(r *http.Request) {
			select {
			case <-time.After(150 * time.Millisecond):
			case <-r.Context().Done():
			}
		}
		// A generous StoreTimeout: a busy machine must not turn a slow
		// Redis reply into a 503 here.
		cfg := idempotency.Config{StoreTimeout: 10 * time.Second}
		var ins []*redisIntInstance
		for i := range instances {
			ins = append(ins, b.instance(t, cfg, redisIntOrders(&runs, "instance-"+strconv.Itoa(i), slow), nil))
		}
		hc := redisIntHTTPClient(t)
		key := redisIntKey(t)

		start := make(chan struct{})
		results := make([]redisIntResponse, requests)
		errs := make([]error, requests)
		var wg sync.WaitGroup
		for i := range requests {
			wg.Go(func() {
				<-start
				results[i], errs[i] = redisIntPost(t.Context(), hc, ins[i%instances].url, key)
			})
		}
		close(start)
		wg.Wait()

		require.Equal(t, int32(1), runs.Load(), "the handler ran exactly once across %d instances", instances)
		var first []redisIntResponse
		conflicts, replays := 0, 0
		for i, r := range results {
			require.NoError(t, errs[i])
			require.Less(t, r.status, 500, "request %d: never a 5xx: %s", i, r.body)
			if r.status == http.StatusCreated && !r.replayed() {
				first = append(first, r)
			}
		}
		require.Len(t, first, 1, "exactly one first execution")
		for i, r := range results {
			switch {
			case r.status == http.StatusConflict:
				conflicts++
				assert.NotEmpty(t, r.header.Get("Retry-After"), "request %d: 409 carries Retry-After", i)
				assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemInProgress, r.problemType())
			case r.replayed():
				replays++
				assert.Equal(t, http.StatusCreated, r.status, "request %d", i)
				assert.Equal(t, first[0].body, r.body, "request %d: the replay is the first response", i)
				assert.Equal(t, first[0].header.Get("Location"), r.header.Get("Location"))
			default:
				assert.Equal(t, http.StatusCreated, r.status, "request %d: 409, the replay, or the one first execution: %s", i, r.body)
			}
		}
		t.Logf("%d requests over %d instances: 1 execution, %d conflicts, %d replays", requests, instances, conflicts, replays)

		// Afterwards every instance replays the one stored response.
		for i, in := range ins {
			r := redisIntMustPost(t, hc, in.url, key)
			assert.Equal(t, http.StatusCreated, r.status, "instance %d", i)
			assert.True(t, r.replayed(), "instance %d", i)
			assert.Equal(t, first[0].body, r.body, "instance %d", i)
		}
		assert.Equal(t, int32(1), runs.Load())
	})
}

func TestRedisIntegrationOutage(t *testing.T) {
	binary := redisServerBinary(t)
	port := redisFreePort(t)
	stop := redisStartServer(t, binary, port)
	b := redisIntLocalBackend(port)

	const storeTimeout = 300 * time.Millisecond
	var closedRuns, openRuns atomic.Int32
	// Two middlewares, fail closed and FailOpen, on one client, as a
	// service with one Redis client would have.
	closed := b.instance(t, idempotency.Config{StoreTimeout: storeTimeout}, redisIntOrders(&closedRuns, "closed", nil), nil)
	openStore := closed.store
	openEvents := &redisIntEvents{}
	openSrv := httptest.NewServer(idempotency.New(idempotency.Config{
		Store: openStore, StoreTimeout: storeTimeout, FailOpen: true, Observer: openEvents.observe,
	})(redisIntOrders(&openRuns, "open", nil)))
	t.Cleanup(openSrv.Close)
	hc := redisIntHTTPClient(t)

	r := redisIntPostUntilServed(t, hc, closed.url, redisIntKey(t)+"-before")
	require.Equal(t, http.StatusCreated, r.status, "Redis is up: %s", r.body)
	require.Equal(t, int32(1), closedRuns.Load())

	stop()

	t.Run("fail closed", func(t *testing.T) {
		began := time.Now()
		r := redisIntMustPost(t, hc, closed.url, redisIntKey(t))
		elapsed := time.Since(began)
		redisIntAssertUnavailable(t, r)
		assert.Less(t, elapsed, storeTimeout+redisIntSlack, "bounded by StoreTimeout")
		assert.Equal(t, int32(1), closedRuns.Load(), "the handler did not run")
		assert.NotEmpty(t, closed.events.errs(idempotency.OutcomeStoreError))
	})
	t.Run("fail open", func(t *testing.T) {
		began := time.Now()
		r := redisIntMustPost(t, hc, openSrv.URL, redisIntKey(t))
		elapsed := time.Since(began)
		assert.Equal(t, http.StatusCreated, r.status, "the handler ran unprotected: %s", r.body)
		assert.False(t, r.replayed())
		assert.Equal(t, int32(1), openRuns.Load())
		assert.Less(t, elapsed, storeTimeout+redisIntSlack, "bounded by StoreTimeout")
		assert.Equal(t, 1, openEvents.count(idempotency.OutcomeStoreError))
	})

	// The same server comes back on the same port. Nothing is restarted on
	// the client side: same middlewares, same go-redis client.
	redisStartServer(t, binary, port)
	for name, url := range map[string]string{"fail closed": closed.url, "fail open": openSrv.URL} {
		t.Run("resumes "+name, func(t *testing.T) {
			key := redisIntKey(t)
			r := redisIntPostUntilServed(t, hc, url, key)
			require.Equal(t, http.StatusCreated, r.status, "service resumed: %s", r.body)
			assert.False(t, r.replayed())
			again := redisIntPostUntilServed(t, hc, url, key)
			assert.Equal(t, http.StatusCreated, again.status)
			assert.True(t, again.replayed(), "protected again: the retry replays")
			assert.Equal(t, r.body, again.body)
		})
	}
	assert.Equal(t, int32(2), closedRuns.Load())
	assert.Equal(t, int32(2), openRuns.Load())
}

func TestRedisIntegrationSilentServer(t *testing.T) {
	// A Redis that accepts connections and never answers. With
	// ContextTimeoutEnabled the client applies StoreTimeout to the socket;
	// without it, each call would wait for the client's ReadTimeout.
	b := &redisIntBackend{addr: redisSilentListener(t), prefix: "idempotency-test:"}
	const storeTimeout = 200 * time.Millisecond
	hc := redisIntHTTPClient(t)

	for _, failOpen := range []bool{false, true} {
		t.Run("FailOpen="+strconv.FormatBool(failOpen), func(t *testing.T) {
			var runs atomic.Int32
			in := b.instance(t, idempotency.Config{StoreTimeout: storeTimeout, FailOpen: failOpen}, redisIntOrders(&runs, "silent", nil), nil)

			began := time.Now()
			r := redisIntMustPost(t, hc, in.url, redisIntKey(t))
			elapsed := time.Since(began)
			assert.Less(t, elapsed, storeTimeout+redisIntSlack, "bounded by StoreTimeout, not the 5s ReadTimeout")
			errs := in.events.errs(idempotency.OutcomeStoreError)
			require.Len(t, errs, 1)
			assert.True(t, errors.Is(errs[0], context.DeadlineExceeded) || isNetTimeout(errs[0]), "a timeout: %v", errs[0])
			if failOpen {
				assert.Equal(t, http.StatusCreated, r.status, "the handler ran unprotected: %s", r.body)
				assert.Equal(t, int32(1), runs.Load())
				return
			}
			redisIntAssertUnavailable(t, r)
			assert.Zero(t, runs.Load(), "the handler did not run")
		})
	}
}

func TestRedisIntegrationCrashedClaimTakenOver(t *testing.T) {
	redisIntBackends(t, func(t *testing.T, b *redisIntBackend) {
		const lockTTL = 300 * time.Millisecond
		var runs atomic.Int32
		in := b.instance(t, idempotency.Config{LockTTL: lockTTL}, redisIntOrders(&runs, "survivor", nil), nil)
		hc := redisIntHTTPClient(t)
		key := redisIntKey(t)

		// A process claimed the key with its own token and crashed before
		// completing it.
		rec, err := in.store.Claim(t.Context(), idempotency.StorageKey("", key), "crashed-process", lockTTL)
		require.NoError(t, err)
		require.Nil(t, rec)

		r := redisIntMustPost(t, hc, in.url, key)
		assert.Equal(t, http.StatusConflict, r.status, "the crashed claim is still held: %s", r.body)
		assert.NotEmpty(t, r.header.Get("Retry-After"))
		assert.Zero(t, runs.Load())

		b.advance(lockTTL)
		r = redisIntMustPost(t, hc, in.url, key)
		assert.Equal(t, http.StatusCreated, r.status, "taken over after LockTTL: %s", r.body)
		assert.False(t, r.replayed())
		assert.Equal(t, int32(1), runs.Load())

		again := redisIntMustPost(t, hc, in.url, key)
		assert.True(t, again.replayed())
		assert.Equal(t, r.body, again.body)
		assert.Equal(t, int32(1), runs.Load())
	})
}

// redisIntStuckStore is a store whose lease renewals never reach Redis, as
// when the owner is cut off from it, and that reports the result of every
// Complete or Release on completed.
type redisIntStuckStore struct {
	idempotency.Store
	completed chan error
}

var errRedisIntExtendBlocked = errors.New("renewal blocked by the test")

func (s *redisIntStuckStore) Extend(context.Context, string, string, time.Duration) error {
	return errRedisIntExtendBlocked
}

func (s *redisIntStuckStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	err := s.Store.Complete(ctx, key, token, rec, ttl)
	s.completed <- err
	return err
}

func (s *redisIntStuckStore) Release(ctx context.Context, key, token string) error {
	err := s.Store.Release(ctx, key, token)
	s.completed <- err
	return err
}

func TestRedisIntegrationLateCompletionRefused(t *testing.T) {
	redisIntBackends(t, func(t *testing.T, b *redisIntBackend) {
		const lockTTL = 400 * time.Millisecond
		cfg := idempotency.Config{LockTTL: lockTTL}
		var runs atomic.Int32

		// The old owner: a slow handler whose renewals fail. It ignores its
		// cancelled context, as a careless handler would, and writes late.
		stuck := &redisIntStuckStore{completed: make(chan error, 8)}
		started, release := make(chan struct{}), make(chan struct{})
		var oldCause atomic.Value
		old := b.instance(t, cfg, redisIntOrders(&runs, "old-owner", func(r *http.Request) {
			close(started)
			<-release
			oldCause.Store(fmt.Sprint(context.Cause(r.Context())))
		}), func(s idempotency.Store) idempotency.Store {
			stuck.Store = s
			return stuck
		})
		newOwner := b.instance(t, cfg, redisIntOrders(&runs, "new-owner", nil), nil)
		other := b.instance(t, cfg, redisIntOrders(&runs, "other", nil), nil)
		hc := redisIntHTTPClient(t)
		key := redisIntKey(t)

		oldDone := make(chan redisIntResponse, 1)
		go func() {
			r, err := redisIntPost(t.Context(), hc, old.url, key)
			assert.NoError(t, err)
			oldDone <- r
		}()
		<-started

		// The lease runs out in Redis; another instance takes the key over
		// and completes it.
		b.advance(lockTTL)
		r := redisIntMustPost(t, hc, newOwner.url, key)
		require.Equal(t, http.StatusCreated, r.status, "the new owner took the key over: %s", r.body)
		require.False(t, r.replayed())
		require.Contains(t, r.body, `"created_by":"new-owner"`)

		// The old owner learns it lost the lease; then its handler finishes.
		require.Eventually(t, func() bool { return old.events.count(idempotency.OutcomeLeaseLost) > 0 },
			5*time.Second, 10*time.Millisecond, "the observer reports the lost lease")
		close(release)
		oldResp := <-oldDone
		assert.Equal(t, http.StatusCreated, oldResp.status, "the old client still gets what its handler wrote")
		assert.Contains(t, oldResp.body, `"created_by":"old-owner"`)
		assert.Equal(t, idempotency.ErrLeaseLost.Error(), oldCause.Load(), "the handler's context said why")

		select {
		case err := <-stuck.completed:
			// Told its lease was lost, the old owner stores nothing and
			// gives the claim back only if it is still its own: it is not.
			assert.ErrorIs(t, err, idempotency.ErrNotOwner, "the late owner cannot touch the new owner's record")
		case <-time.After(5 * time.Second):
			t.Fatal("the old owner never gave the claim back")
		}
		assert.Zero(t, old.events.count(idempotency.OutcomeExecuted))

		// The record is the new owner's, wherever it is read.
		for name, in := range map[string]*redisIntInstance{"old": old, "new": newOwner, "other": other} {
			replay := redisIntMustPost(t, hc, in.url, key)
			assert.Equal(t, http.StatusCreated, replay.status, name)
			assert.True(t, replay.replayed(), name)
			assert.Equal(t, r.body, replay.body, "%s: the replay shows the new owner's body", name)
		}
		assert.Equal(t, int32(2), runs.Load(), "the old and the new owner, nobody else")
	})
}

func TestRedisIntegrationCorruptRecordFailsClosed(t *testing.T) {
	redisIntBackends(t, func(t *testing.T, b *redisIntBackend) {
		garbage := map[string]string{
			"not a record":    "garbage, not a record",
			"json":            `{"state":2,"token":"t","status":200}`,
			"unknown version": "\x7f\x02\x01t",
		}
		for _, failOpen := range []bool{false, true} {
			var runs atomic.Int32
			in := b.instance(t, idempotency.Config{FailOpen: failOpen}, redisIntOrders(&runs, "instance", nil), nil)
			hc := redisIntHTTPClient(t)
			for name, value := range garbage {
				t.Run(name+"/FailOpen="+strconv.FormatBool(failOpen), func(t *testing.T) {
					key := redisIntKey(t)
					redisKey := b.prefix + idempotency.StorageKey("", key)
					require.NoError(t, in.client.Set(t.Context(), redisKey, value, time.Hour).Err())
					before := runs.Load()

					r := redisIntMustPost(t, hc, in.url, key)
					redisIntAssertUnavailable(t, r)
					assert.Equal(t, before, runs.Load(), "never a re-execution")
					errs := in.events.errs(idempotency.OutcomeStoreError)
					require.NotEmpty(t, errs)
					assert.ErrorIs(t, errs[len(errs)-1], idempotency.ErrCorruptRecord)

					raw, err := in.client.Get(t.Context(), redisKey).Result()
					require.NoError(t, err)
					assert.Equal(t, value, raw, "the record was left for an operator to inspect")
				})
			}
		}
	})
}

func TestRedisIntegrationBriefOutageDuringCompletion(t *testing.T) {
	binary := redisServerBinary(t)
	port := redisFreePort(t)
	redisStartServer(t, binary, port)
	b := redisIntLocalBackend(port)
	control := b.client(t)

	// Redis stops answering writes for a while just as the handler
	// returns: well past StoreTimeout, well within the lease.
	const (
		storeTimeout = 100 * time.Millisecond
		lockTTL      = 5 * time.Second
		pause        = 600 * time.Millisecond
	)
	var runs atomic.Int32
	var pauseNext atomic.Bool
	in := b.instance(t, idempotency.Config{StoreTimeout: storeTimeout, LockTTL: lockTTL},
		redisIntOrders(&runs, "instance", func(r *http.Request) {
			if pauseNext.CompareAndSwap(true, false) {
				// CLIENT PAUSE WRITE holds every script run (they may
				// write) of every client until the pause ends; the
				// control client is not held, as PAUSE itself is not
				// a write.
				err := control.Do(r.Context(), "CLIENT", "PAUSE", strconv.FormatInt(pause.Milliseconds(), 10), "WRITE").Err()
				assert.NoError(t, err)
			}
		}), nil)
	hc := redisIntHTTPClient(t)

	// Warm up, so that both scripts are cached on the server.
	warm := redisIntPostUntilServed(t, hc, in.url, redisIntKey(t)+"-warm-up")
	require.Equal(t, http.StatusCreated, warm.status)
	require.Equal(t, int32(1), runs.Load())

	key := redisIntKey(t)
	pauseNext.Store(true)
	r := redisIntPostUntilServed(t, hc, in.url, key)
	assert.Equal(t, http.StatusCreated, r.status, r.body)
	assert.False(t, r.replayed())
	assert.Positive(t, in.events.completionErrors(), "completion attempts failed during the pause")
	require.Eventually(t, func() bool { return in.events.count(idempotency.OutcomeExecuted) == 2 }, 5*time.Second, time.Millisecond,
		"and a retry in the background stored the response")

	again := redisIntPostUntilServed(t, hc, in.url, key)
	assert.Equal(t, http.StatusCreated, again.status)
	assert.True(t, again.replayed(), "the retry replays")
	assert.Equal(t, r.body, again.body)
	assert.Equal(t, int32(2), runs.Load(), "the handler ran once for the key")
}

func TestRedisIntegrationRoundTrips(t *testing.T) {
	redisIntBackends(t, redisIntRoundTrips)
	// With WithReplicaAcks on a master with a replica: the WAIT rides in
	// the script's round trip.
	t.Run("sentinel-replica-acks", func(t *testing.T) {
		redisIntRoundTrips(t, redisSentinelBackend(t, idempotency.WithReplicaAcks(1, time.Second)))
	})
}

// redisIntRoundTrips counts the Redis round trips of a first execution, a
// replay and a conflict on b.
func redisIntRoundTrips(t *testing.T, b *redisIntBackend) {
	var runs atomic.Int32
	var gate atomic.Pointer[chan struct{}]
	started := make(chan struct{}, 1)
	in := b.instance(t, idempotency.Config{}, redisIntOrders(&runs, "instance", func(*http.Request) {
		if g := gate.Load(); g != nil {
			started <- struct{}{}
			<-*g
		}
	}), nil)
	hc := redisIntHTTPClient(t)
	trips := func(step string, want int) {
		t.Helper()
		assert.Equal(t, want, in.hook.total(), "%s: Redis round trips", step)
		assert.Zero(t, in.hook.evalCount(), "%s: the scripts were cached", step)
		in.hook.reset()
	}

	// Warm up: the first run of each script falls back from EVALSHA to
	// EVAL, which caches it on the server.
	warm := redisIntKey(t) + "-warm-up"
	require.Equal(t, http.StatusCreated, redisIntMustPost(t, hc, in.url, warm).status)
	require.True(t, redisIntMustPost(t, hc, in.url, warm).replayed())
	in.hook.reset()

	key := redisIntKey(t)
	r := redisIntMustPost(t, hc, in.url, key)
	require.Equal(t, http.StatusCreated, r.status)
	require.False(t, r.replayed())
	trips("first execution", 2)

	r = redisIntMustPost(t, hc, in.url, key)
	require.True(t, r.replayed())
	trips("replay", 1)

	// A conflict: the key of a request still running.
	g := make(chan struct{})
	gate.Store(&g)
	busy := redisIntKey(t) + "-busy"
	done := make(chan redisIntResponse, 1)
	go func() {
		r, err := redisIntPost(t.Context(), hc, in.url, busy)
		assert.NoError(t, err)
		done <- r
	}()
	<-started
	trips("claim of the running request", 1)
	r = redisIntMustPost(t, hc, in.url, busy)
	require.Equal(t, http.StatusConflict, r.status)
	trips("conflict", 1)
	gate.Store(nil)
	close(g)
	require.Equal(t, http.StatusCreated, (<-done).status)
	trips("completion of the running request", 1)
}
