package idempotency_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// lcServer is a test server: a counting handler behind the middleware.
type lcServer struct {
	*httptest.Server
	runs   atomic.Int64
	events *lcEvents
}

// lcEvents records what the observer saw.
type lcEvents struct {
	mu  sync.Mutex
	all []idempotency.Event
}

func (e *lcEvents) observe(ev idempotency.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.all = append(e.all, ev)
}

func (e *lcEvents) count(o idempotency.Outcome) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, ev := range e.all {
		if ev.Outcome == o {
			n++
		}
	}
	return n
}

// lcStart serves h behind New(cfg); the handler run count is kept.
func lcStart(t *testing.T, cfg idempotency.Config, h http.HandlerFunc) *lcServer {
	t.Helper()
	s := &lcServer{events: &lcEvents{}}
	if cfg.Observer == nil {
		cfg.Observer = s.events.observe
	}
	counted := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.runs.Add(1)
		h(w, r)
	})
	s.Server = httptest.NewServer(idempotency.New(cfg)(counted))
	t.Cleanup(s.Close)
	return s
}

// lcCreated is a handler that reads the body and answers 201 with JSON.
func lcCreated(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", "/orders/1")
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"echo":%q}`, body)
}

type lcResult struct {
	status int
	header http.Header
	body   string
}

func (r lcResult) replayed() bool { return r.header.Get(idempotency.ReplayedHeader) == "true" }

func (r lcResult) problem(t *testing.T) map[string]any {
	t.Helper()
	assert.Equal(t, "application/problem+json", r.header.Get("Content-Type"))
	assert.Equal(t, "no-store", r.header.Get("Cache-Control"))
	var p map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.body), &p), r.body)
	return p
}

// lcDo sends one request; key "" sends no key header.
func lcDo(t *testing.T, url, method, key, body string) lcResult {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return lcResult{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

// lcCountingStore counts calls to each Store method.
type lcCountingStore struct {
	idempotency.Store
	calls atomic.Int64
}

func (s *lcCountingStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	s.calls.Add(1)
	return s.Store.Claim(ctx, key, token, lease)
}

// lcFaultStore wraps a store and lets a test fail chosen operations.
type lcFaultStore struct {
	idempotency.Store
	mu sync.Mutex
	// fail maps an operation name to how many of its next calls fail
	// (-1: all) and the error they return.
	fail map[string]int
	err  map[string]error
}

func lcNewFaultStore() *lcFaultStore {
	return &lcFaultStore{Store: idempotency.NewMemoryStore(), fail: map[string]int{}, err: map[string]error{}}
}

func (s *lcFaultStore) setFail(op string, n int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail[op], s.err[op] = n, err
}

func (s *lcFaultStore) check(op string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.fail[op]
	if n == 0 {
		return nil
	}
	if n > 0 {
		s.fail[op] = n - 1
	}
	return s.err[op]
}

func (s *lcFaultStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	if err := s.check("claim"); err != nil {
		return nil, err
	}
	return s.Store.Claim(ctx, key, token, lease)
}

func (s *lcFaultStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	if err := s.check("extend"); err != nil {
		return err
	}
	return s.Store.Extend(ctx, key, token, lease)
}

func (s *lcFaultStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	if err := s.check("complete"); err != nil {
		return err
	}
	return s.Store.Complete(ctx, key, token, rec, ttl)
}

func (s *lcFaultStore) Release(ctx context.Context, key, token string) error {
	if err := s.check("release"); err != nil {
		return err
	}
	return s.Store.Release(ctx, key, token)
}

var errLcDown = errors.New("store is down")

// lcNoLeak fails the test if goroutines started during it are still alive
// shortly after it ends.
func lcNoLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		http.DefaultClient.CloseIdleConnections()
		deadline := time.Now().Add(3 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<16)
			t.Errorf("goroutines leaked: %d before, %d after\n%s", before, n, buf[:runtime.Stack(buf, true)])
		}
	})
}

func TestLifecycleFirstExecutionAndReplay(t *testing.T) {
	lcNoLeak(t)
	s := lcStart(t, idempotency.Config{}, lcCreated)

	first := lcDo(t, s.URL, http.MethodPost, "order-1", `{"item":"book"}`)
	assert.Equal(t, http.StatusCreated, first.status)
	assert.False(t, first.replayed())
	assert.Empty(t, first.header.Values(idempotency.ReplayedHeader))

	second := lcDo(t, s.URL, http.MethodPost, "order-1", `{"item":"book"}`)
	assert.Equal(t, http.StatusCreated, second.status)
	assert.True(t, second.replayed())
	assert.Equal(t, first.body, second.body)
	assert.Equal(t, "/orders/1", second.header.Get("Location"))
	assert.Equal(t, "application/json", second.header.Get("Content-Type"))
	assert.Equal(t, strconv.Itoa(len(first.body)), second.header.Get("Content-Length"))
	assert.EqualValues(t, 1, s.runs.Load())
	assert.Equal(t, 1, s.events.count(idempotency.OutcomeExecuted))
	assert.Equal(t, 1, s.events.count(idempotency.OutcomeReplayed))

	// The quoted form of a key is the same key.
	third := lcDo(t, s.URL, http.MethodPost, `"order-1"`, `{"item":"book"}`)
	assert.True(t, third.replayed())
	assert.EqualValues(t, 1, s.runs.Load())
}

func TestLifecycleStep1MissingAndInvalidKeys(t *testing.T) {
	store := &lcCountingStore{Store: idempotency.NewMemoryStore()}
	s := lcStart(t, idempotency.Config{Store: store}, lcCreated)

	// Missing: passes through untouched, no store access.
	r := lcDo(t, s.URL, http.MethodPost, "", `{}`)
	assert.Equal(t, http.StatusCreated, r.status)
	assert.False(t, r.replayed())
	r = lcDo(t, s.URL, http.MethodPost, "", `{}`)
	assert.Equal(t, http.StatusCreated, r.status)
	assert.EqualValues(t, 2, s.runs.Load())

	// Methods not covered pass through, even with a key.
	r = lcDo(t, s.URL, http.MethodGet, "k", "")
	assert.Equal(t, http.StatusCreated, r.status)
	assert.EqualValues(t, 3, s.runs.Load())
	assert.EqualValues(t, 0, store.calls.Load())

	invalid := map[string]string{
		"comma":        "a,b",
		"space":        "a b",
		"double quote": `a"b`,
		"too long":     strings.Repeat("k", 256),
		"unterminated": `"abc`,
		"empty quoted": `""`,
		"non-ascii":    "caf\u00e9",
	}
	for name, key := range invalid {
		t.Run(name, func(t *testing.T) {
			r := lcDo(t, s.URL, http.MethodPost, key, `{}`)
			assert.Equal(t, http.StatusBadRequest, r.status)
			p := r.problem(t)
			assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyInvalid, p["type"])
			assert.EqualValues(t, http.StatusBadRequest, p["status"])
			assert.NotEmpty(t, p["detail"])
			assert.NotEmpty(t, p["title"])
		})
	}
	assert.EqualValues(t, 3, s.runs.Load())
	assert.EqualValues(t, 0, store.calls.Load())

	// Two header lines.
	req, _ := http.NewRequest(http.MethodPost, s.URL, strings.NewReader("{}"))
	req.Header.Add("Idempotency-Key", "a")
	req.Header.Add("Idempotency-Key", "b")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.EqualValues(t, 0, store.calls.Load())
}

func TestLifecycleRequireKey(t *testing.T) {
	s := lcStart(t, idempotency.Config{RequireKey: true, HeaderName: "X-Request-Key"}, lcCreated)
	r := lcDo(t, s.URL, http.MethodPost, "", `{}`)
	assert.Equal(t, http.StatusBadRequest, r.status)
	p := r.problem(t)
	assert.Equal(t, "X-Request-Key header is required", p["detail"])
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyRequired, p["type"])
	assert.EqualValues(t, 0, s.runs.Load())
	assert.Equal(t, 1, s.events.count(idempotency.OutcomeKeyMissing))

	// GET is not covered: no key needed.
	r = lcDo(t, s.URL, http.MethodGet, "", "")
	assert.Equal(t, http.StatusCreated, r.status)
}

func TestLifecycleStep2KeyScope(t *testing.T) {
	s := lcStart(t, idempotency.Config{KeyScope: func(r *http.Request) string { return r.Header.Get("X-User") }},
		func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusCreated)
			fmt.Fprint(w, "for ", r.Header.Get("X-User"))
		})
	send := func(user string) lcResult {
		req, _ := http.NewRequest(http.MethodPost, s.URL, strings.NewReader("{}"))
		req.Header.Set("Idempotency-Key", "shared")
		req.Header.Set("X-User", user)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return lcResult{resp.StatusCode, resp.Header, string(b)}
	}
	a, b := send("alice"), send("bob")
	assert.Equal(t, "for alice", a.body)
	assert.Equal(t, "for bob", b.body)
	assert.False(t, b.replayed())
	a2 := send("alice")
	assert.True(t, a2.replayed())
	assert.Equal(t, "for alice", a2.body)
	assert.EqualValues(t, 2, s.runs.Load())
}

func TestLifecycleStep4Mismatch(t *testing.T) {
	s := lcStart(t, idempotency.Config{}, lcCreated)
	lcDo(t, s.URL, http.MethodPost, "k", `{"amount":10}`)
	r := lcDo(t, s.URL, http.MethodPost, "k", `{"amount":99}`)
	assert.Equal(t, http.StatusUnprocessableEntity, r.status)
	p := r.problem(t)
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyReused, p["type"])
	assert.Contains(t, p["detail"], "already used for a different request")
	assert.False(t, r.replayed())
	assert.EqualValues(t, 1, s.runs.Load())
	assert.Equal(t, 1, s.events.count(idempotency.OutcomeMismatch))

	// A different path is a different request too.
	r = lcDo(t, s.URL+"/other", http.MethodPost, "k", `{"amount":10}`)
	assert.Equal(t, http.StatusUnprocessableEntity, r.status)

	// With the fingerprint off, the key alone decides.
	off := lcStart(t, idempotency.Config{Fingerprint: func(*http.Request) []byte { return nil }}, lcCreated)
	lcDo(t, off.URL, http.MethodPost, "k", `{"amount":10}`)
	r = lcDo(t, off.URL, http.MethodPost, "k", `{"amount":99}`)
	assert.Equal(t, http.StatusCreated, r.status)
	assert.True(t, r.replayed())
	assert.EqualValues(t, 1, off.runs.Load())
}

func TestLifecycleStep5InFlightConflict(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{})
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
		lcCreated(w, r)
	})
	done := make(chan lcResult)
	go func() { done <- lcDo(t, s.URL, http.MethodPost, "k", `{}`) }()
	<-started

	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusConflict, r.status)
	assert.Equal(t, "1", r.header.Get("Retry-After"))
	p := r.problem(t)
	assert.Equal(t, "A request with this Idempotency-Key is already in progress", p["detail"])
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemInProgress, p["type"])
	assert.False(t, r.replayed())

	close(release)
	first := <-done
	assert.Equal(t, http.StatusCreated, first.status)
	assert.EqualValues(t, 1, s.runs.Load())
	assert.Equal(t, 1, s.events.count(idempotency.OutcomeConflict))
}

// lcLeaseStore reports a fixed lease left for in-flight records.
type lcLeaseStore struct {
	idempotency.Store
	left time.Duration
}

func (s lcLeaseStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	rec, err := s.Store.Claim(ctx, key, token, lease)
	if rec != nil && rec.State == idempotency.StateInFlight {
		cp := *rec
		cp.LeaseRemaining = s.left
		return &cp, err
	}
	return rec, err
}

func TestLifecycleStep5RetryAfterNeverBeyondLease(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	s := lcStart(t, idempotency.Config{
		Store:      lcLeaseStore{Store: idempotency.NewMemoryStore(), left: 2500 * time.Millisecond},
		RetryAfter: 5 * time.Second,
	}, func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
	})
	done := make(chan struct{})
	go func() { lcDo(t, s.URL, http.MethodPost, "k", `{}`); close(done) }()
	<-started
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusConflict, r.status)
	assert.Equal(t, "2", r.header.Get("Retry-After"))
	close(release)
	<-done
}

func TestLifecycleStep6RenewalKeepsSlowHandler(t *testing.T) {
	lcNoLeak(t)
	started := make(chan struct{})
	s := lcStart(t, idempotency.Config{LockTTL: 150 * time.Millisecond}, func(w http.ResponseWriter, r *http.Request) {
		close(started)
		select {
		case <-time.After(700 * time.Millisecond): // several lease periods
		case <-r.Context().Done():
			t.Errorf("handler context cancelled: %v", context.Cause(r.Context()))
		}
		lcCreated(w, r)
	})
	done := make(chan lcResult)
	go func() { done <- lcDo(t, s.URL, http.MethodPost, "slow", `{}`) }()
	<-started
	for i := 0; i < 4; i++ {
		time.Sleep(150 * time.Millisecond)
		r := lcDo(t, s.URL, http.MethodPost, "slow", `{}`)
		if r.status != http.StatusCreated { // the first may already be done near the end
			assert.Equal(t, http.StatusConflict, r.status, "a living handler was taken over")
		}
	}
	assert.Equal(t, http.StatusCreated, (<-done).status)
	assert.EqualValues(t, 1, s.runs.Load())
	assert.Zero(t, s.events.count(idempotency.OutcomeLeaseLost))
}

func TestLifecycleStep6LeaseLostCancelsHandler(t *testing.T) {
	lcNoLeak(t)
	store := lcNewFaultStore()
	store.setFail("extend", -1, idempotency.ErrNotOwner)
	cause := make(chan error, 1)
	s := lcStart(t, idempotency.Config{Store: store, LockTTL: 90 * time.Millisecond}, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			cause <- context.Cause(r.Context())
		case <-time.After(5 * time.Second):
			cause <- nil
		}
		w.WriteHeader(http.StatusCreated)
	})
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusCreated, r.status)
	assert.ErrorIs(t, <-cause, idempotency.ErrLeaseLost)
	assert.GreaterOrEqual(t, s.events.count(idempotency.OutcomeLeaseLost), 1)
}

func TestLifecycleStep6RenewalFailureRetriedWithinLease(t *testing.T) {
	store := lcNewFaultStore()
	store.setFail("extend", 2, errLcDown) // two failures, then it works
	// The renewal at LockTTL/3 and its two retries, LockTTL/10 apart, end
	// well inside the lease, with room for a loaded machine's late timers.
	s := lcStart(t, idempotency.Config{Store: store, LockTTL: 900 * time.Millisecond}, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			t.Errorf("lease lost after transient renewal failures: %v", context.Cause(r.Context()))
		case <-time.After(1500 * time.Millisecond):
		}
		w.WriteHeader(http.StatusCreated)
	})
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusCreated, r.status)
	assert.Zero(t, s.events.count(idempotency.OutcomeLeaseLost))
	assert.True(t, lcDo(t, s.URL, http.MethodPost, "k", `{}`).replayed())
}

func TestLifecycleStep7NotStoredOutcomesAreReleased(t *testing.T) {
	for _, status := range []int{500, 502, 503, 408, 429} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(status) })
			assert.Equal(t, status, lcDo(t, s.URL, http.MethodPost, "k", `{}`).status)
			r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
			assert.Equal(t, status, r.status)
			assert.False(t, r.replayed())
			assert.EqualValues(t, 2, s.runs.Load())
			assert.Equal(t, 2, s.events.count(idempotency.OutcomeReleased))
		})
	}
	for _, status := range []int{200, 201, 204, 400, 404, 409, 422} {
		t.Run("stored "+strconv.Itoa(status), func(t *testing.T) {
			s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(status) })
			lcDo(t, s.URL, http.MethodPost, "k", `{}`)
			r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
			assert.Equal(t, status, r.status)
			assert.True(t, r.replayed())
			assert.EqualValues(t, 1, s.runs.Load())
		})
	}
	t.Run("custom policy stores 500", func(t *testing.T) {
		s := lcStart(t, idempotency.Config{ShouldStore: func(int) bool { return true }},
			func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(500) })
		lcDo(t, s.URL, http.MethodPost, "k", `{}`)
		r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
		assert.Equal(t, 500, r.status)
		assert.True(t, r.replayed())
	})
}

func TestLifecycleStep7CompletionRetriedAfterStoreBlip(t *testing.T) {
	store := lcNewFaultStore()
	store.setFail("complete", 3, errLcDown)
	s := lcStart(t, idempotency.Config{Store: store}, lcCreated)
	first := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusCreated, first.status)
	require.Eventually(t, func() bool { return s.events.count(idempotency.OutcomeExecuted) == 1 }, 5*time.Second, time.Millisecond,
		"the background retries store it")
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.True(t, r.replayed())
	assert.Equal(t, first.body, r.body)
	assert.EqualValues(t, 1, s.runs.Load())
	assert.Equal(t, 3, s.events.count(idempotency.OutcomeStoreError))
}

func TestLifecycleStep7ClientDisconnectStillStores(t *testing.T) {
	lcNoLeak(t)
	clientGone := make(chan struct{})
	handlerDone := make(chan struct{})
	var once sync.Once
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		// net/http notices a hang-up once the body has been read.
		body, _ := io.ReadAll(r.Body)
		once.Do(func() {
			defer close(handlerDone)
			<-r.Context().Done() // the client hung up; the work still finishes
			<-clientGone
		})
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, "created from %s", body)
	})

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.URL, strings.NewReader(`{"a":1}`))
	req.Header.Set("Idempotency-Key", "k")
	req.Header.Set("Content-Type", "application/json")
	go func() {
		time.Sleep(50 * time.Millisecond)
		cancel()
		close(clientGone)
	}()
	_, err := http.DefaultClient.Do(req)
	require.Error(t, err)
	<-handlerDone

	require.Eventually(t, func() bool {
		return s.events.count(idempotency.OutcomeExecuted) == 1
	}, 2*time.Second, 5*time.Millisecond)
	r := lcDo(t, s.URL, http.MethodPost, "k", `{"a":1}`)
	assert.Equal(t, http.StatusCreated, r.status)
	assert.True(t, r.replayed())
	assert.EqualValues(t, 1, s.runs.Load())
}

func TestLifecycleStep8PanicReleasesAndPropagates(t *testing.T) {
	cases := map[string]func(){
		"panic":           func() { panic("boom") },
		"ErrAbortHandler": func() { panic(http.ErrAbortHandler) },
		"Goexit":          runtime.Goexit,
	}
	for name, fail := range cases {
		t.Run(name, func(t *testing.T) {
			var runs atomic.Int64
			var recovered atomic.Value
			inner := idempotency.New(idempotency.Config{})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if runs.Add(1) == 1 {
					fail()
				}
				w.WriteHeader(http.StatusCreated)
			}))
			outer := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				done := make(chan struct{})
				go func() { // run in its own goroutine so Goexit can be observed
					defer close(done)
					defer func() {
						if v := recover(); v != nil {
							recovered.Store(fmt.Sprint(v))
							w.WriteHeader(http.StatusTeapot)
						}
					}()
					inner.ServeHTTP(w, r)
				}()
				<-done
			})
			srv := httptest.NewServer(outer)
			defer srv.Close()

			r := lcDo(t, srv.URL, http.MethodPost, "k", `{}`)
			switch name {
			case "panic":
				assert.Equal(t, "boom", recovered.Load(), "the original panic value must propagate")
				assert.Equal(t, http.StatusTeapot, r.status)
			case "ErrAbortHandler":
				assert.Equal(t, http.ErrAbortHandler.Error(), recovered.Load())
			}
			// The claim was released: the retry runs.
			r = lcDo(t, srv.URL, http.MethodPost, "k", `{}`)
			assert.Equal(t, http.StatusCreated, r.status)
			assert.False(t, r.replayed())
			assert.EqualValues(t, 2, runs.Load())
		})
	}
}

func TestLifecycleStep8PanicStackIsOriginal(t *testing.T) {
	h := idempotency.New(idempotency.Config{})(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		lcPanickingFrame()
	}))
	req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("{}"))
	req.Header.Set("Idempotency-Key", "k")
	var stack string
	func() {
		defer func() {
			require.Equal(t, "deep", recover())
			buf := make([]byte, 1<<16)
			stack = string(buf[:runtime.Stack(buf, false)])
		}()
		h.ServeHTTP(httptest.NewRecorder(), req)
	}()
	assert.Contains(t, stack, "lcPanickingFrame", "the panic must not be recovered and re-raised")
}

func lcPanickingFrame() { panic("deep") }

func TestLifecycleStep9StaleOwnerDoesNotOverwrite(t *testing.T) {
	// The first request's lease expires (its renewals are refused) and a
	// second request takes the key over and completes; the first one's late
	// completion must be refused.
	store := lcNewFaultStore()
	store.setFail("extend", 1, errLcDown)
	firstStarted := make(chan struct{})
	secondDone := make(chan struct{})
	var n atomic.Int64
	s := lcStart(t, idempotency.Config{Store: store, LockTTL: 60 * time.Millisecond}, func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			store.setFail("extend", -1, errLcDown)
			close(firstStarted)
			<-secondDone
			w.WriteHeader(http.StatusCreated)
			fmt.Fprint(w, "first")
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprint(w, "second")
	})
	firstResult := make(chan lcResult)
	go func() { firstResult <- lcDo(t, s.URL, http.MethodPost, "k", `{}`) }()
	<-firstStarted
	var second lcResult
	require.Eventually(t, func() bool {
		second = lcDo(t, s.URL, http.MethodPost, "k", `{}`)
		return second.status == http.StatusCreated
	}, 3*time.Second, 20*time.Millisecond)
	assert.Equal(t, "second", second.body)
	store.setFail("extend", 0, nil)
	close(secondDone)
	assert.Equal(t, "first", (<-firstResult).body)

	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.True(t, r.replayed())
	assert.Equal(t, "second", r.body, "the stale owner overwrote the new owner's record")
	assert.GreaterOrEqual(t, s.events.count(idempotency.OutcomeLeaseLost), 1)
}

func TestLifecycleExactlyOnce(t *testing.T) {
	lcNoLeak(t)
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(20 * time.Millisecond)
		lcCreated(w, r)
	})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 200}}
	defer client.CloseIdleConnections()
	const n = 200
	var wg sync.WaitGroup
	var created, conflicts, replays, other atomic.Int64
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			req, _ := http.NewRequest(http.MethodPost, s.URL, strings.NewReader(`{"x":1}`))
			req.Header.Set("Idempotency-Key", "once")
			resp, err := client.Do(req)
			if !assert.NoError(t, err) {
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			switch {
			case resp.StatusCode == http.StatusConflict && resp.Header.Get("Retry-After") != "":
				conflicts.Add(1)
			case resp.StatusCode == http.StatusCreated && resp.Header.Get(idempotency.ReplayedHeader) == "true":
				replays.Add(1)
			case resp.StatusCode == http.StatusCreated:
				created.Add(1)
			default:
				other.Add(1)
			}
		}()
	}
	close(start)
	wg.Wait()
	assert.EqualValues(t, 1, s.runs.Load())
	assert.EqualValues(t, 1, created.Load())
	assert.EqualValues(t, n-1, conflicts.Load()+replays.Load())
	assert.Zero(t, other.Load())
}

func TestProblemStoreUnavailableAndFailOpen(t *testing.T) {
	store := lcNewFaultStore()
	store.setFail("claim", -1, errLcDown)
	s := lcStart(t, idempotency.Config{Store: store}, lcCreated)
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusServiceUnavailable, r.status)
	assert.Equal(t, "1", r.header.Get("Retry-After"))
	p := r.problem(t)
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemStoreUnavailable, p["type"])
	assert.Contains(t, p["detail"], "idempotency store is unavailable")
	assert.NotContains(t, r.body, errLcDown.Error(), "internal error text reached the client")
	assert.EqualValues(t, 0, s.runs.Load())

	// Service resumes by itself.
	store.setFail("claim", 0, nil)
	assert.Equal(t, http.StatusCreated, lcDo(t, s.URL, http.MethodPost, "k", `{}`).status)

	open := lcNewFaultStore()
	open.setFail("claim", -1, errLcDown)
	fo := lcStart(t, idempotency.Config{Store: open, FailOpen: true}, lcCreated)
	assert.Equal(t, http.StatusCreated, lcDo(t, fo.URL, http.MethodPost, "k", `{}`).status)
	assert.EqualValues(t, 1, fo.runs.Load())
	assert.Equal(t, 1, fo.events.count(idempotency.OutcomeStoreError))

	// An unreadable record fails closed even under FailOpen.
	corrupt := lcNewFaultStore()
	corrupt.setFail("claim", -1, fmt.Errorf("decoding: %w", idempotency.ErrCorruptRecord))
	fc := lcStart(t, idempotency.Config{Store: corrupt, FailOpen: true}, lcCreated)
	assert.Equal(t, http.StatusServiceUnavailable, lcDo(t, fc.URL, http.MethodPost, "k", `{}`).status)
	assert.EqualValues(t, 0, fc.runs.Load())
}

// lcHangingStore blocks in Claim until the context ends.
type lcHangingStore struct{ idempotency.Store }

func (lcHangingStore) Claim(ctx context.Context, _, _ string, _ time.Duration) (*idempotency.Record, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestProblemStoreHangIsBounded(t *testing.T) {
	s := lcStart(t, idempotency.Config{Store: lcHangingStore{idempotency.NewMemoryStore()}, StoreTimeout: 100 * time.Millisecond}, lcCreated)
	start := time.Now()
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusServiceUnavailable, r.status)
	assert.Less(t, time.Since(start), 5*time.Second, "a hung store must not hang the request")
}

func TestProblemStoreFull(t *testing.T) {
	s := lcStart(t, idempotency.Config{Store: idempotency.NewMemoryStore(idempotency.WithMaxEntries(1))}, lcCreated)
	assert.Equal(t, http.StatusCreated, lcDo(t, s.URL, http.MethodPost, "a", `{}`).status)
	r := lcDo(t, s.URL, http.MethodPost, "b", `{}`)
	assert.Equal(t, http.StatusServiceUnavailable, r.status)
	assert.NotEmpty(t, r.header.Get("Retry-After"))
	p := r.problem(t)
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemStoreFull, p["type"])
	assert.Contains(t, p["detail"], "idempotency store is full")
	assert.Equal(t, 1, s.events.count(idempotency.OutcomeStoreFull))
	// The stored record was not evicted.
	assert.True(t, lcDo(t, s.URL, http.MethodPost, "a", `{}`).replayed())
}

func TestProblemResponseTooLargeIsNotStored(t *testing.T) {
	big := strings.Repeat("x", 4096)
	s := lcStart(t, idempotency.Config{MaxResponseSize: 1024}, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Location", "/exports/7")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, big)
	})
	first := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusCreated, first.status)
	assert.Equal(t, big, first.body, "the first client gets the whole response")

	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusInternalServerError, r.status)
	p := r.problem(t)
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemNotStored, p["type"])
	assert.Contains(t, p["detail"], "not stored")
	assert.EqualValues(t, 201, p["original_status"])
	assert.Equal(t, "/exports/7", p["location"])
	assert.EqualValues(t, 1, s.runs.Load())
	assert.Equal(t, 1, s.events.count(idempotency.OutcomeNotStored))
}

func TestProblemHijackedIsNotStored(t *testing.T) {
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		conn, buf, err := http.NewResponseController(w).Hijack()
		if !assert.NoError(t, err) {
			return
		}
		defer conn.Close()
		buf.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
		buf.Flush()
	})
	// A raw connection, since the hijacked one closes.
	conn, err := net.Dial("tcp", s.Listener.Addr().String())
	require.NoError(t, err)
	fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: x\r\nIdempotency-Key: h\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	conn.Close()
	assert.Equal(t, "hi", string(b))
	// The client has its bytes before the handler returns: wait for the
	// completion.
	require.Eventually(t, func() bool { return s.events.count(idempotency.OutcomeNotStored) == 1 },
		5*time.Second, time.Millisecond)

	r := lcDo(t, s.URL, http.MethodPost, "h", `{}`)
	assert.Equal(t, http.StatusInternalServerError, r.status)
	assert.Contains(t, r.problem(t)["detail"], "hijacked")
	assert.EqualValues(t, 1, s.runs.Load())
}

func TestReplayHeaders(t *testing.T) {
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Set-Cookie", "session=secret")
		h.Set("WWW-Authenticate", `Bearer realm="x"`)
		h.Set("Date", "Mon, 01 Jan 2024 00:00:00 GMT")
		h.Add("X-Multi", "a, b")
		h.Add("X-Multi", "c")
		h.Set("Link", `</a>; rel="next", </b>; rel="prev"`)
		w.WriteHeader(http.StatusCreated)
		h.Set("X-After-Header", "late") // not part of the response
		io.WriteString(w, "body")
	})
	first := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, "session=secret", first.header.Get("Set-Cookie"))
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.True(t, r.replayed())
	assert.Empty(t, r.header.Values("Set-Cookie"))
	assert.Empty(t, r.header.Values("WWW-Authenticate"))
	assert.NotEqual(t, "Mon, 01 Jan 2024 00:00:00 GMT", r.header.Get("Date"))
	assert.Equal(t, []string{"a, b", "c"}, r.header.Values("X-Multi"))
	assert.Equal(t, `</a>; rel="next", </b>; rel="prev"`, r.header.Get("Link"))
	assert.Empty(t, r.header.Values("X-After-Header"))
	assert.Equal(t, "4", r.header.Get("Content-Length"))
	assert.Equal(t, "body", r.body)
}

// lcHeaderMutator changes the replayed header after the middleware wrote it.
func TestReplayDoesNotShareStoredSlices(t *testing.T) {
	store := idempotency.NewMemoryStore()
	mw := idempotency.New(idempotency.Config{Store: store})
	h := mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("X-V", "one")
		w.WriteHeader(http.StatusCreated)
	}))
	send := func() *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("{}"))
		req.Header.Set("Idempotency-Key", "k")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	send()
	replay := send()
	require.Equal(t, "true", replay.Header().Get(idempotency.ReplayedHeader))
	replay.Header()["X-V"][0] = "changed"
	replay.Header().Add("X-V", "two")
	again := send()
	assert.Equal(t, []string{"one"}, again.Header().Values("X-V"))
}

func TestKeyFromContext(t *testing.T) {
	var got string
	var ok bool
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		got, ok = idempotency.KeyFromContext(r.Context())
	})
	lcDo(t, s.URL, http.MethodPost, `"abc"`, `{}`)
	assert.True(t, ok)
	assert.Equal(t, "abc", got)
}

func TestNewPanicsOnInvalidConfig(t *testing.T) {
	cases := map[string]idempotency.Config{
		"negative TTL":        {TTL: -time.Second},
		"negative LockTTL":    {LockTTL: -time.Second},
		"empty methods":       {Methods: []string{}},
		"bad header name":     {HeaderName: "Idempotency Key"},
		"negative size cap":   {MaxResponseSize: -1},
		"negative body limit": {FingerprintBodyLimit: -1},
		"bad method":          {Methods: []string{"PO ST"}},
	}
	for name, cfg := range cases {
		t.Run(name, func(t *testing.T) {
			defer func() {
				v := recover()
				require.NotNil(t, v)
				assert.True(t, strings.HasPrefix(fmt.Sprint(v), "idempotency: "), v)
			}()
			idempotency.New(cfg)
		})
	}
}

func TestMethodsConfig(t *testing.T) {
	s := lcStart(t, idempotency.Config{Methods: []string{"post", "delete"}}, lcCreated)
	lcDo(t, s.URL, http.MethodDelete, "k", "")
	assert.True(t, lcDo(t, s.URL, http.MethodDelete, "k", "").replayed())
	lcDo(t, s.URL, http.MethodPut, "p", "")
	assert.False(t, lcDo(t, s.URL, http.MethodPut, "p", "").replayed())
}
