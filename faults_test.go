package idempotency_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// These tests break the store at each point of the request lifecycle and
// check the documented outcome. Every request has a client timeout, so a
// hang fails the test instead of stalling it, and every test checks that
// no goroutine outlives it.

// faultOp names a Store operation.
type faultOp string

const (
	faultClaim    faultOp = "claim"
	faultExtend   faultOp = "extend"
	faultComplete faultOp = "complete"
	faultRelease  faultOp = "release"
)

// faultKind is what happens to a call a rule matches.
type faultKind int

const (
	// faultFail returns an error; the inner store is not called.
	faultFail faultKind = iota + 1
	// faultDelay waits before calling the inner store; a context that
	// ends first makes the call fail, unapplied, with its error.
	faultDelay
	// faultDrop calls the inner store, so the operation is applied, then
	// returns an error, as when the reply to a command is lost.
	faultDrop
)

// errFaultInjected is the error returned by failed and dropped calls.
var errFaultInjected = errors.New("fault: injected store failure")

// faultRule injects kind into calls first..first+count-1 (1-based) of op;
// a negative count means every call from first on.
type faultRule struct {
	op    faultOp
	first int
	count int
	kind  faultKind
	delay time.Duration
}

func (r faultRule) matches(op faultOp, n int) bool {
	return r.op == op && n >= r.first && (r.count < 0 || n < r.first+r.count)
}

// faultStore is a Store that passes calls to an inner store, injecting the
// faults its rules describe. It is safe for concurrent use.
type faultStore struct {
	inner idempotency.Store

	mu    sync.Mutex
	rules []faultRule
	calls map[faultOp]int
}

var _ idempotency.Store = (*faultStore)(nil)

func newFaultStore(inner idempotency.Store, rules ...faultRule) *faultStore {
	return &faultStore{inner: inner, rules: rules, calls: map[faultOp]int{}}
}

// heal removes every rule: the store works from now on.
func (s *faultStore) heal() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rules = nil
}

// count returns how many calls of op the store received.
func (s *faultStore) count(op faultOp) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[op]
}

// enter counts a call of op and returns the rule that matches it, if any.
func (s *faultStore) enter(op faultOp) (faultRule, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls[op]++
	n := s.calls[op]
	for _, r := range s.rules {
		if r.matches(op, n) {
			return r, true
		}
	}
	return faultRule{}, false
}

// do runs apply, the inner call, under the fault that matches op.
func (s *faultStore) do(ctx context.Context, op faultOp, apply func() error) error {
	r, ok := s.enter(op)
	if !ok {
		return apply()
	}
	switch r.kind {
	case faultFail:
		return fmt.Errorf("%s: %w", op, errFaultInjected)
	case faultDelay:
		t := time.NewTimer(r.delay)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", op, ctx.Err())
		case <-t.C:
		}
		return apply()
	case faultDrop:
		_ = apply()
		return fmt.Errorf("%s: reply lost: %w", op, errFaultInjected)
	}
	panic("fault: unknown kind")
}

func (s *faultStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	var rec *idempotency.Record
	err := s.do(ctx, faultClaim, func() (err error) {
		rec, err = s.inner.Claim(ctx, key, token, lease)
		return err
	})
	if err != nil {
		return nil, err
	}
	return rec, nil
}

func (s *faultStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	return s.do(ctx, faultExtend, func() error { return s.inner.Extend(ctx, key, token, lease) })
}

func (s *faultStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	return s.do(ctx, faultComplete, func() error { return s.inner.Complete(ctx, key, token, rec, ttl) })
}

func (s *faultStore) Release(ctx context.Context, key, token string) error {
	return s.do(ctx, faultRelease, func() error { return s.inner.Release(ctx, key, token) })
}

func (s *faultStore) Get(ctx context.Context, key string) (*idempotency.Record, error) {
	return s.inner.Get(ctx, key)
}

func (s *faultStore) Delete(ctx context.Context, key string) error {
	return s.inner.Delete(ctx, key)
}

// faultEvents collects what the observer reports.
type faultEvents = lcEvents

// faultServer is a handler behind the middleware on a test server.
type faultServer struct {
	url    string
	client *http.Client
	runs   atomic.Int64
	events *faultEvents
}

// faultServe serves h behind New(cfg), counting the handler's runs and
// recording the observer's events. Requests time out after 10 s.
func faultServe(t *testing.T, cfg idempotency.Config, h http.HandlerFunc) *faultServer {
	t.Helper()
	fs := &faultServer{events: &faultEvents{}}
	cfg.Observer = fs.events.observe
	srv := httptest.NewServer(idempotency.New(cfg)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fs.runs.Add(1)
		h(w, r)
	})))
	t.Cleanup(srv.Close)
	fs.url = srv.URL
	fs.client = srv.Client()
	fs.client.Timeout = 10 * time.Second
	return fs
}

// faultResult is what a client received.
type faultResult struct {
	status int
	header http.Header
	body   string
}

func (r faultResult) replayed() bool { return r.header.Get(idempotency.ReplayedHeader) == "true" }

// problemType returns the type member of a problem response.
func (r faultResult) problemType(t *testing.T) string {
	t.Helper()
	var p struct{ Type string }
	require.NoError(t, json.Unmarshal([]byte(r.body), &p), "body %q", r.body)
	return p.Type
}

func (fs *faultServer) do(t *testing.T, key string) faultResult {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, fs.url+"/orders", strings.NewReader(`{"amount":42}`))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := fs.client.Do(req)
	require.NoError(t, err, "the request must not hang")
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return faultResult{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

// faultCreated is the handler of most tests: 201 with a body that tells
// executions apart.
func faultCreated(fs **faultServer) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"order":%d}`, (*fs).runs.Load())
	}
}

// faultServeCreated serves faultCreated.
func faultServeCreated(t *testing.T, cfg idempotency.Config) *faultServer {
	t.Helper()
	var fs *faultServer
	fs = faultServe(t, cfg, faultCreated(&fs))
	return fs
}

// faultNoLeak fails t if goroutines started during it outlive it.
func faultNoLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<16)
			t.Errorf("goroutines leaked: %d before, %d after\n%s", before, n, buf[:runtime.Stack(buf, true)])
		}
	})
}

// faultEventually calls cond, in the test's goroutine, until it reports
// true, failing t after a generous bound.
func faultEventually(t *testing.T, cond func() bool, msg string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// faultLockTTL is the lease of these tests: short, so that waiting for a
// claim to expire keeps the file fast.
const faultLockTTL = 200 * time.Millisecond

func TestFaultStoreWrapper(t *testing.T) {
	inner := idempotency.NewMemoryStore()
	s := newFaultStore(inner,
		faultRule{op: faultClaim, first: 2, count: 1, kind: faultFail},
		faultRule{op: faultClaim, first: 3, count: 1, kind: faultDrop},
		faultRule{op: faultClaim, first: 4, count: -1, kind: faultDelay, delay: time.Hour},
	)
	ctx := context.Background()
	key := idempotency.StorageKey("", "k")

	rec, err := s.Claim(ctx, key, "t1", time.Minute)
	require.NoError(t, err, "call 1 has no fault")
	assert.Nil(t, rec)
	require.NoError(t, inner.Release(ctx, key, "t1"))

	_, err = s.Claim(ctx, key, "t2", time.Minute)
	assert.ErrorIs(t, err, errFaultInjected, "call 2 fails")
	got, err := inner.Get(ctx, key)
	require.NoError(t, err)
	assert.Nil(t, got, "a failed call is not applied")

	_, err = s.Claim(ctx, key, "t3", time.Minute)
	assert.ErrorIs(t, err, errFaultInjected, "call 3 is dropped")
	got, err = inner.Get(ctx, key)
	require.NoError(t, err)
	require.NotNil(t, got, "a dropped call is applied")
	assert.Equal(t, "t3", got.Token)

	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	_, err = s.Claim(short, idempotency.StorageKey("", "other"), "t4", time.Minute)
	assert.ErrorIs(t, err, context.DeadlineExceeded, "a delay ends with the context")
	assert.Equal(t, 4, s.count(faultClaim))

	s.heal()
	rec, err = s.Claim(ctx, idempotency.StorageKey("", "other"), "t5", time.Minute)
	assert.NoError(t, err)
	assert.Nil(t, rec)
}

func TestFaultClaimFails(t *testing.T) {
	faultNoLeak(t)
	t.Run("fail closed", func(t *testing.T) {
		store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultClaim, first: 1, count: 2, kind: faultFail})
		fs := faultServeCreated(t, idempotency.Config{Store: store, LockTTL: faultLockTTL})
		for range 2 {
			r := fs.do(t, "claim-fails")
			assert.Equal(t, http.StatusServiceUnavailable, r.status)
			assert.Equal(t, "1", r.header.Get("Retry-After"))
			assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemStoreUnavailable, r.problemType(t))
			assert.NotContains(t, r.body, errFaultInjected.Error(), "internal error text reached the client")
		}
		assert.Zero(t, fs.runs.Load(), "the handler never runs unprotected")
		assert.Equal(t, 2, fs.events.count(idempotency.OutcomeStoreError))

		// The store is back: service resumes by itself.
		first := fs.do(t, "claim-fails")
		assert.Equal(t, http.StatusCreated, first.status)
		retry := fs.do(t, "claim-fails")
		assert.True(t, retry.replayed())
		assert.Equal(t, first.body, retry.body)
		assert.EqualValues(t, 1, fs.runs.Load())
	})
	t.Run("fail open", func(t *testing.T) {
		store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultClaim, first: 1, count: 1, kind: faultFail})
		fs := faultServeCreated(t, idempotency.Config{Store: store, LockTTL: faultLockTTL, FailOpen: true})
		r := fs.do(t, "fail-open")
		assert.Equal(t, http.StatusCreated, r.status, "FailOpen runs the handler unprotected")
		assert.False(t, r.replayed())
		assert.Equal(t, 1, fs.events.count(idempotency.OutcomeStoreError))
		// Nothing was stored for the unprotected run: the retry runs the
		// handler again. That is the price of FailOpen.
		again := fs.do(t, "fail-open")
		assert.Equal(t, http.StatusCreated, again.status)
		assert.False(t, again.replayed())
		assert.EqualValues(t, 2, fs.runs.Load())
		assert.Equal(t, 1, store.count(faultComplete), "only the protected run completes")
	})
}

func TestFaultClaimDelayedPastStoreTimeout(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultClaim, first: 1, count: 1, kind: faultDelay, delay: time.Minute})
	fs := faultServeCreated(t, idempotency.Config{Store: store, LockTTL: faultLockTTL, StoreTimeout: 100 * time.Millisecond})
	start := time.Now()
	r := fs.do(t, "slow-claim")
	took := time.Since(start)
	assert.Equal(t, http.StatusServiceUnavailable, r.status)
	assert.Less(t, took, 5*time.Second, "StoreTimeout bounds a claim that hangs")
	assert.Zero(t, fs.runs.Load())

	// The delayed claim was never applied: the next request runs.
	assert.Equal(t, http.StatusCreated, fs.do(t, "slow-claim").status)
	assert.EqualValues(t, 1, fs.runs.Load())
}

// TestFaultClaimReplyLost: the claim reaches the store but its reply is
// lost. The request gets 503 and never runs, yet the key is claimed by a
// token only that request knew. If the middleware releases that claim
// (best effort, right after the failure), the client's retry runs at once;
// if not, or if the release fails too, the retry gets 409 until the lease
// runs out, at most LockTTL later, and then runs. Either way a lost claim
// reply delays a request by at most LockTTL and never runs it twice.
func TestFaultClaimReplyLost(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultClaim, first: 1, count: 1, kind: faultDrop})
	fs := faultServeCreated(t, idempotency.Config{Store: store, LockTTL: faultLockTTL})

	start := time.Now()
	r := fs.do(t, "lost-claim")
	assert.Equal(t, http.StatusServiceUnavailable, r.status)
	assert.Zero(t, fs.runs.Load())

	retry := fs.do(t, "lost-claim")
	released := store.count(faultRelease) > 0
	switch retry.status {
	case http.StatusCreated:
		assert.True(t, released || time.Since(start) >= faultLockTTL,
			"the retry ran while the orphaned claim should still hold the key, and it was not released")
	case http.StatusConflict:
		assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemInProgress, retry.problemType(t))
	default:
		t.Errorf("retry got %d %s", retry.status, retry.body)
	}

	last := retry
	faultEventually(t, func() bool {
		if last.status != http.StatusConflict {
			return true
		}
		last = fs.do(t, "lost-claim")
		return false
	}, "the orphaned claim expires")
	if !released {
		assert.GreaterOrEqual(t, time.Since(start), faultLockTTL, "the key was free only once the lease ran out")
	}
	assert.Equal(t, http.StatusCreated, last.status)
	assert.False(t, last.replayed())
	assert.True(t, fs.do(t, "lost-claim").replayed())
	assert.EqualValues(t, 1, fs.runs.Load())
}

func TestFaultCompleteFailsBriefly(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultComplete, first: 1, count: 2, kind: faultFail})
	fs := faultServeCreated(t, idempotency.Config{Store: store, LockTTL: faultLockTTL})
	first := fs.do(t, "blip")
	assert.Equal(t, http.StatusCreated, first.status)
	faultEventually(t, func() bool { return fs.events.count(idempotency.OutcomeExecuted) == 1 }, "the background retries store it")
	assert.Equal(t, 3, store.count(faultComplete), "two failures, then the retry stored it")
	assert.Equal(t, 2, fs.events.count(idempotency.OutcomeStoreError))
	assert.Equal(t, 1, fs.events.count(idempotency.OutcomeExecuted))

	retry := fs.do(t, "blip")
	assert.True(t, retry.replayed())
	assert.Equal(t, first.body, retry.body)
	assert.EqualValues(t, 1, fs.runs.Load())
}

// TestFaultCompleteFailsPastLease: the store is down from the end of the
// handler until after the lease. The first client still gets its
// response, written through as the handler wrote it; the completion is
// retried while the lease lasts and then given up; the claim expires
// within LockTTL and the client's retry runs the handler again. This is
// the at-least-once window: it is why handlers pass the key downstream.
func TestFaultCompleteFailsPastLease(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultComplete, first: 1, count: -1, kind: faultFail})
	fs := faultServeCreated(t, idempotency.Config{Store: store, LockTTL: faultLockTTL})
	start := time.Now()
	first := fs.do(t, "outage")
	assert.Equal(t, http.StatusCreated, first.status, "the response is delivered")
	assert.JSONEq(t, `{"order":1}`, first.body)
	assert.Less(t, time.Since(start), faultLockTTL, "the client does not wait for the completion retries")
	faultEventually(t, func() bool {
		return fs.events.count(idempotency.OutcomeLeaseLost)+fs.events.count(idempotency.OutcomeNotStored) > 0
	}, "the completion retries give up")
	assert.Greater(t, store.count(faultComplete), 1, "completion was retried")
	assert.Less(t, time.Since(start), 5*time.Second, "completion retries end with the lease")
	assert.Zero(t, fs.events.count(idempotency.OutcomeExecuted))
	// The key may now run again: the observer must hear of it (as a lost
	// lease, or as a response that was not stored), or a second execution
	// would go unreported.
	assert.Equal(t, 1, fs.events.count(idempotency.OutcomeLeaseLost)+fs.events.count(idempotency.OutcomeNotStored),
		"completion given up without telling the observer")

	store.heal()
	var second faultResult
	faultEventually(t, func() bool {
		second = fs.do(t, "outage")
		return second.status != http.StatusConflict
	}, "the claim expires")
	assert.Equal(t, http.StatusCreated, second.status)
	assert.False(t, second.replayed(), "at least once: the retry ran again")
	assert.JSONEq(t, `{"order":2}`, second.body)
	assert.EqualValues(t, 2, fs.runs.Load())
	assert.True(t, fs.do(t, "outage").replayed())
}

func TestFaultCompleteReplyLost(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultComplete, first: 1, count: 1, kind: faultDrop})
	fs := faultServeCreated(t, idempotency.Config{Store: store, LockTTL: faultLockTTL})
	first := fs.do(t, "lost-complete")
	assert.Equal(t, http.StatusCreated, first.status)
	faultEventually(t, func() bool { return fs.events.count(idempotency.OutcomeExecuted) == 1 }, "the background retry stores it")
	assert.Equal(t, 2, store.count(faultComplete), "the completion was sent again")
	assert.Equal(t, 1, fs.events.count(idempotency.OutcomeExecuted), "the re-sent completion is accepted")
	assert.Zero(t, fs.events.count(idempotency.OutcomeLeaseLost))

	retry := fs.do(t, "lost-complete")
	assert.True(t, retry.replayed())
	assert.Equal(t, first.body, retry.body)
	assert.EqualValues(t, 1, fs.runs.Load())
}

// TestFaultReleaseFails: the handler's outcome is not stored (a 503), so
// the claim is released, but the release fails. The claim then expires
// within LockTTL, and the retry runs.
func TestFaultReleaseFails(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultRelease, first: 1, count: 1, kind: faultFail})
	fs := faultServe(t, idempotency.Config{Store: store, LockTTL: faultLockTTL}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	start := time.Now()
	assert.Equal(t, http.StatusServiceUnavailable, fs.do(t, "release").status)
	assert.Equal(t, 1, store.count(faultRelease))
	assert.Equal(t, 1, fs.events.count(idempotency.OutcomeStoreError))

	var retry faultResult
	faultEventually(t, func() bool {
		retry = fs.do(t, "release")
		return retry.status != http.StatusConflict
	}, "the unreleased claim expires")
	assert.GreaterOrEqual(t, time.Since(start), faultLockTTL/2)
	assert.Equal(t, http.StatusServiceUnavailable, retry.status)
	assert.False(t, retry.replayed())
	assert.EqualValues(t, 2, fs.runs.Load(), "the retry ran")
}

func TestFaultReleaseReplyLost(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultRelease, first: 1, count: 1, kind: faultDrop})
	fs := faultServe(t, idempotency.Config{Store: store, LockTTL: time.Minute}, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTooManyRequests)
	})
	assert.Equal(t, http.StatusTooManyRequests, fs.do(t, "release").status)
	// The release was applied: the retry runs at once, long before the
	// one-minute lease would have run out.
	assert.Equal(t, http.StatusTooManyRequests, fs.do(t, "release").status)
	assert.EqualValues(t, 2, fs.runs.Load())
}

// faultSlowHandler holds the request for d (several lease periods) and
// reports whether its context was cancelled, and with which cause.
func faultSlowHandler(d time.Duration, cause chan<- error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(d):
			cause <- nil
			w.WriteHeader(http.StatusCreated)
		case <-r.Context().Done():
			cause <- context.Cause(r.Context())
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}
}

func TestFaultRenewalFailsTransiently(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(),
		faultRule{op: faultExtend, first: 1, count: 2, kind: faultFail},
		faultRule{op: faultExtend, first: 3, count: 1, kind: faultDrop},
	)
	cause := make(chan error, 1)
	fs := faultServe(t, idempotency.Config{Store: store, LockTTL: faultLockTTL}, faultSlowHandler(4*faultLockTTL, cause))

	done := make(chan faultResult, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, fs.url+"/orders", strings.NewReader(`{"amount":42}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", "renew")
		resp, err := fs.client.Do(req)
		if err != nil {
			done <- faultResult{}
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		done <- faultResult{status: resp.StatusCode, header: resp.Header}
	}()
	faultEventually(t, func() bool { return fs.runs.Load() == 1 }, "the handler starts")
	// While the handler lives, its key is never taken over, whatever the
	// renewals went through.
	for i := 0; i < 3; i++ {
		time.Sleep(faultLockTTL / 2)
		if r := fs.do(t, "renew"); r.status != http.StatusCreated {
			assert.Equal(t, http.StatusConflict, r.status, "a living handler was taken over")
		}
	}
	assert.NoError(t, <-cause, "transient renewal failures must not lose the lease")
	assert.Equal(t, http.StatusCreated, (<-done).status)
	assert.GreaterOrEqual(t, store.count(faultExtend), 4, "failed renewals were retried")
	assert.Zero(t, fs.events.count(idempotency.OutcomeLeaseLost))
	assert.True(t, fs.do(t, "renew").replayed())
	assert.EqualValues(t, 1, fs.runs.Load())
}

func TestFaultRenewalFailsPermanently(t *testing.T) {
	faultNoLeak(t)
	store := newFaultStore(idempotency.NewMemoryStore(), faultRule{op: faultExtend, first: 1, count: -1, kind: faultFail})
	cause := make(chan error, 1)
	fs := faultServe(t, idempotency.Config{Store: store, LockTTL: faultLockTTL}, faultSlowHandler(time.Minute, cause))
	start := time.Now()
	r := fs.do(t, "lost-lease")
	var err error
	select {
	case err = <-cause:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler was never told its lease was lost")
	}
	assert.ErrorIs(t, err, idempotency.ErrLeaseLost, "context.Cause tells the handler why")
	assert.Less(t, time.Since(start), 10*time.Second)
	assert.Equal(t, http.StatusServiceUnavailable, r.status, "what the handler wrote on cancellation")
	assert.Equal(t, 1, fs.events.count(idempotency.OutcomeLeaseLost), "the observer is told")
	assert.Greater(t, store.count(faultExtend), 1, "the renewal was retried before giving up")

	// The lease is gone: the next request runs.
	store.heal()
	cause2 := make(chan error, 1)
	fs2 := faultServe(t, idempotency.Config{Store: store, LockTTL: faultLockTTL}, faultSlowHandler(0, cause2))
	assert.Equal(t, http.StatusCreated, fs2.do(t, "lost-lease").status)
	assert.NoError(t, <-cause2)
}
