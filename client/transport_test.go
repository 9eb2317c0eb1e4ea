package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// uuidV4 matches the keys NewKey makes.
var uuidV4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// fakeSleeper replaces Transport.sleep: it records each wait instead of
// sleeping, and may run a hook before returning.
type fakeSleeper struct {
	mu     sync.Mutex
	waits  []time.Duration
	before func(n int) // called with the 1-based number of the wait
}

func (f *fakeSleeper) sleep(ctx context.Context, d time.Duration) error {
	f.mu.Lock()
	f.waits = append(f.waits, d)
	n := len(f.waits)
	f.mu.Unlock()
	if f.before != nil {
		f.before(n)
	}
	return ctx.Err()
}

func (f *fakeSleeper) recorded() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Duration(nil), f.waits...)
}

// attemptCounter is a Base transport that counts the attempts it sends
// and records the key each one carried.
type attemptCounter struct {
	base *http.Transport
	mu   sync.Mutex
	keys []string
}

func (a *attemptCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	a.mu.Lock()
	a.keys = append(a.keys, r.Header.Get(DefaultHeaderName))
	a.mu.Unlock()
	return a.base.RoundTrip(r)
}

func (a *attemptCounter) attempts() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.keys)
}

func (a *attemptCounter) sentKeys() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.keys...)
}

// newTestTransport returns a Transport with a fake sleeper and a counting
// base that opens a new connection for every attempt, so net/http's own
// retry of requests on reused connections never adds attempts.
func newTestTransport(t *testing.T) (*Transport, *attemptCounter, *fakeSleeper) {
	t.Helper()
	base := &http.Transport{DisableKeepAlives: true}
	t.Cleanup(base.CloseIdleConnections)
	counter := &attemptCounter{base: base}
	sleeper := &fakeSleeper{}
	return &Transport{Base: counter, sleep: sleeper.sleep}, counter, sleeper
}

// newRequest returns a request made with the test's context.
func newRequest(t *testing.T, method, url string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(testContext(t), method, url, body)
	require.NoError(t, err)
	return req
}

// roundTrip sends req through tr and returns its response, whose body is
// closed when the test ends.
func roundTrip(t *testing.T, tr http.RoundTripper, req *http.Request) *http.Response {
	t.Helper()
	resp, err := tr.RoundTrip(req)
	require.NoError(t, err)
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// testContext bounds a test so that a hang fails instead of blocking.
func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// orderHandler is the application behind the middleware in these tests: it
// creates an order per execution and says so.
type orderHandler struct {
	executions atomic.Int32
	started    chan struct{} // when not nil, closed by the first execution
	release    chan struct{} // when not nil, the handler waits for it
	once       sync.Once
}

func (h *orderHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	n := h.executions.Add(1)
	if h.started != nil {
		h.once.Do(func() { close(h.started) })
	}
	if h.release != nil {
		<-h.release
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", fmt.Sprintf("/orders/%d", n))
	w.WriteHeader(http.StatusCreated)
	_, _ = fmt.Fprintf(w, `{"order":%d,"request":%q}`, n, body)
}

// lossyFront sits in front of the middleware and loses the response of the
// first drop requests after they were fully processed: the connection is
// hijacked and closed, as a proxy or network failure would.
type lossyFront struct {
	next     http.Handler
	drop     int32
	arrivals atomic.Int32
}

func (l *lossyFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if l.arrivals.Add(1) > l.drop {
		l.next.ServeHTTP(w, r)
		return
	}
	l.next.ServeHTTP(httptest.NewRecorder(), r) // executes, response lost
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	_ = conn.Close()
}

func TestTransportRecoversLostResponses(t *testing.T) {
	app := &orderHandler{}
	front := &lossyFront{next: idempotency.New(idempotency.Config{})(app), drop: 2}
	srv := httptest.NewServer(front)
	t.Cleanup(srv.Close)
	tr, counter, sleeper := newTestTransport(t)

	req := newRequest(t, http.MethodPost, srv.URL+"/orders", strings.NewReader(`{"item":"book"}`))
	resp := roundTrip(t, tr, req)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)

	assert.Equal(t, int32(1), app.executions.Load(), "the handler runs once")
	assert.Equal(t, int32(3), front.arrivals.Load())
	assert.Equal(t, 3, counter.attempts())
	assert.Len(t, sleeper.recorded(), 2)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, "/orders/1", resp.Header.Get("Location"))
	assert.JSONEq(t, `{"order":1,"request":"{\"item\":\"book\"}"}`, string(body), "the original response")
	assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader))

	keys := counter.sentKeys()
	require.Len(t, keys, 3)
	assert.Regexp(t, uuidV4, keys[0])
	assert.Equal(t, []string{keys[0], keys[0], keys[0]}, keys, "one key for every attempt")
	assert.Empty(t, req.Header.Get(DefaultHeaderName), "the caller's request is not modified")
}

func TestTransportNetworkErrorsExhaustAttempts(t *testing.T) {
	app := &orderHandler{}
	front := &lossyFront{next: idempotency.New(idempotency.Config{})(app), drop: 100}
	srv := httptest.NewServer(front)
	t.Cleanup(srv.Close)
	tr, counter, sleeper := newTestTransport(t)
	tr.MaxAttempts = 3

	req := newRequest(t, http.MethodPost, srv.URL, strings.NewReader("x"))
	resp, err := tr.RoundTrip(req)
	require.Error(t, err)
	assert.Nil(t, resp)
	assert.Equal(t, 3, counter.attempts())
	assert.Len(t, sleeper.recorded(), 2)
	assert.Equal(t, int32(1), app.executions.Load(), "the retries were replays")
}

func TestTransportRetryDecisions(t *testing.T) {
	inProgress := "https://github.com/f8e778d0/idempotency#" + idempotency.ProblemInProgress
	problem := func(typ string) string {
		return `{"type":"` + typ + `","title":"t","status":409,"detail":"d"}`
	}
	tests := []struct {
		name        string
		status      int
		contentType string
		body        string
		attempts    int
	}{
		{"502 is retried", http.StatusBadGateway, "text/plain", "bad gateway", 3},
		{"503 is retried", http.StatusServiceUnavailable, "text/plain", "unavailable", 3},
		{"504 is retried", http.StatusGatewayTimeout, "text/plain", "timeout", 3},
		{"middleware 409 is retried", http.StatusConflict, "application/problem+json", problem(inProgress), 3},
		{"middleware 409 with parameters is retried", http.StatusConflict, "Application/Problem+JSON; charset=utf-8", problem(inProgress), 3},
		{"400 is not retried", http.StatusBadRequest, "text/plain", "bad", 1},
		{"422 is not retried", http.StatusUnprocessableEntity, "text/plain", "unprocessable", 1},
		{"500 is not retried", http.StatusInternalServerError, "text/plain", "boom", 1},
		{"201 is final", http.StatusCreated, "application/json", `{"id":1}`, 1},
		{"plain 409 is not retried", http.StatusConflict, "text/plain", "conflict", 1},
		{"409 as JSON is not retried", http.StatusConflict, "application/json", problem(inProgress), 1},
		{"409 of another problem type is not retried", http.StatusConflict, "application/problem+json", problem("https://example.com/out-of-stock"), 1},
		{"409 of a type that only starts alike is not retried", http.StatusConflict, "application/problem+json", problem(inProgress + "-x"), 1},
		{"409 longer than the peek limit is not retried", http.StatusConflict, "application/problem+json",
			`{"type":"` + inProgress + `","detail":"` + strings.Repeat("a", problemPeekLimit) + `"}`, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var arrivals atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				arrivals.Add(1)
				w.Header().Set("Content-Type", tt.contentType)
				w.WriteHeader(tt.status)
				_, _ = io.WriteString(w, tt.body)
			}))
			t.Cleanup(srv.Close)
			tr, counter, sleeper := newTestTransport(t)
			tr.MaxAttempts = 3

			resp := roundTrip(t, tr, newRequest(t, http.MethodPost, srv.URL, strings.NewReader("x")))
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)

			assert.Equal(t, tt.attempts, counter.attempts())
			assert.Equal(t, int32(tt.attempts), arrivals.Load())
			assert.Len(t, sleeper.recorded(), tt.attempts-1)
			assert.Equal(t, tt.status, resp.StatusCode)
			assert.Equal(t, tt.body, string(body), "the caller reads the last body whole")
		})
	}
}

// conflictScenario sends a request through the transport while the same
// key is in flight in the middleware. The first wait lets the in-flight
// request finish, so a retry finds the stored response.
func conflictScenario(t *testing.T, serverBase, clientBase string) (*http.Response, *attemptCounter, *fakeSleeper, *orderHandler) {
	t.Helper()
	app := &orderHandler{started: make(chan struct{}), release: make(chan struct{})}
	srv := httptest.NewServer(idempotency.New(idempotency.Config{ProblemTypeBase: serverBase})(app))
	t.Cleanup(srv.Close)
	ctx := testContext(t)
	const key = "conflict-key-1"

	firstDone := make(chan struct{})
	go func() {
		defer close(firstDone)
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/orders", strings.NewReader("same"))
		if err != nil {
			return
		}
		req.Header.Set(DefaultHeaderName, key)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_ = resp.Body.Close()
		}
	}()
	var releaseOnce sync.Once
	releaseFirst := func() {
		releaseOnce.Do(func() { close(app.release) })
		<-firstDone
	}
	t.Cleanup(releaseFirst)
	select {
	case <-app.started:
	case <-ctx.Done():
		t.Fatal("the first request never reached the handler")
	}

	tr, counter, sleeper := newTestTransport(t)
	tr.ProblemTypeBase = clientBase
	sleeper.before = func(int) { releaseFirst() }
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/orders", strings.NewReader("same"))
	require.NoError(t, err)
	req.Header.Set(DefaultHeaderName, key)
	resp, err := tr.RoundTrip(req)
	require.NoError(t, err)
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp, counter, sleeper, app
}

func TestTransportRetriesMiddlewareConflict(t *testing.T) {
	resp, counter, sleeper, app := conflictScenario(t, "", "")

	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader))
	assert.Equal(t, 2, counter.attempts())
	assert.Equal(t, int32(1), app.executions.Load())
	assert.Equal(t, []time.Duration{time.Second}, sleeper.recorded(),
		"the wait is the middleware's Retry-After, which exceeds the first backoff")
}

func TestTransportProblemTypeBase(t *testing.T) {
	const custom = "https://api.example.com/problems/"
	t.Run("matching base is retried", func(t *testing.T) {
		resp, counter, _, app := conflictScenario(t, custom, custom)
		assert.Equal(t, http.StatusCreated, resp.StatusCode)
		assert.Equal(t, 2, counter.attempts())
		assert.Equal(t, int32(1), app.executions.Load())
	})
	t.Run("other base is not retried", func(t *testing.T) {
		resp, counter, sleeper, _ := conflictScenario(t, custom, "")
		assert.Equal(t, http.StatusConflict, resp.StatusCode)
		assert.Equal(t, 1, counter.attempts())
		assert.Empty(t, sleeper.recorded())
		var p idempotency.Problem
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&p), "the body is intact after the peek")
		assert.Equal(t, custom+idempotency.ProblemInProgress, p.Type)
	})
}

func TestTransportHandlerConflictNotRetried(t *testing.T) {
	var executions atomic.Int32
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		executions.Add(1)
		idempotency.WriteProblem(w, r, &idempotency.Problem{
			Type:   "https://shop.example.com/problems/out-of-stock",
			Title:  "Out of stock",
			Status: http.StatusConflict,
			Detail: "The item is out of stock",
		})
	})
	srv := httptest.NewServer(idempotency.New(idempotency.Config{})(handler))
	t.Cleanup(srv.Close)
	tr, counter, sleeper := newTestTransport(t)

	resp := roundTrip(t, tr, newRequest(t, http.MethodPost, srv.URL, strings.NewReader("x")))
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)

	assert.Equal(t, http.StatusConflict, resp.StatusCode)
	assert.Contains(t, string(body), "out-of-stock")
	assert.Equal(t, 1, counter.attempts())
	assert.Equal(t, int32(1), executions.Load())
	assert.Empty(t, sleeper.recorded())
}

// unavailableThenOK answers 503 with the given Retry-After to the first
// failures requests, then 200.
func unavailableThenOK(t *testing.T, failures int32, retryAfter func() string) *httptest.Server {
	t.Helper()
	var arrivals atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if arrivals.Add(1) <= failures {
			if v := retryAfter(); v != "" {
				w.Header().Set("Retry-After", v)
			}
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ok")
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestTransportRetryAfter(t *testing.T) {
	t.Run("delay-seconds is honoured", func(t *testing.T) {
		srv := unavailableThenOK(t, 2, func() string { return "3" })
		tr, counter, sleeper := newTestTransport(t)
		resp := roundTrip(t, tr, newRequest(t, http.MethodPost, srv.URL, nil))
		assert.Equal(t, http.StatusOK, resp.StatusCode)
		assert.Equal(t, 3, counter.attempts())
		assert.Equal(t, []time.Duration{3 * time.Second, 3 * time.Second}, sleeper.recorded())
	})
	t.Run("HTTP-date is honoured", func(t *testing.T) {
		srv := unavailableThenOK(t, 1, func() string {
			return time.Now().Add(5 * time.Second).UTC().Format(http.TimeFormat)
		})
		tr, counter, sleeper := newTestTransport(t)
		roundTrip(t, tr, newRequest(t, http.MethodPost, srv.URL, nil))
		assert.Equal(t, 2, counter.attempts())
		waits := sleeper.recorded()
		require.Len(t, waits, 1)
		// The date has whole seconds and the test may be slow: the wait is
		// whatever was left of the five seconds, never more.
		assert.LessOrEqual(t, waits[0], 5*time.Second)
		assert.Greater(t, waits[0], DefaultBaseDelay, "the server's date, not the backoff")
	})
	t.Run("beyond MaxDelay the response is returned", func(t *testing.T) {
		srv := unavailableThenOK(t, 1, func() string { return "120" })
		tr, counter, sleeper := newTestTransport(t)
		tr.MaxDelay = 30 * time.Second
		// No deadline: the cap alone stops the retry.
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, srv.URL, nil)
		require.NoError(t, err)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		assert.Equal(t, "120", resp.Header.Get("Retry-After"))
		assert.Equal(t, 1, counter.attempts())
		assert.Empty(t, sleeper.recorded())
	})
	t.Run("beyond the context deadline the response is returned", func(t *testing.T) {
		srv := unavailableThenOK(t, 1, func() string { return "5" })
		tr, counter, sleeper := newTestTransport(t)
		ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, nil)
		require.NoError(t, err)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		assert.Equal(t, 1, counter.attempts())
		assert.Empty(t, sleeper.recorded())
	})
	t.Run("http.Client.Timeout is a deadline", func(t *testing.T) {
		srv := unavailableThenOK(t, 1, func() string { return "5" })
		tr, counter, sleeper := newTestTransport(t)
		c := &http.Client{Transport: tr, Timeout: 3 * time.Second}
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, srv.URL, nil)
		require.NoError(t, err)
		resp, err := c.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		assert.Equal(t, 1, counter.attempts())
		assert.Empty(t, sleeper.recorded())
	})
}

func TestTransportBackoff(t *testing.T) {
	srv := unavailableThenOK(t, 100, func() string { return "" })
	tr, counter, sleeper := newTestTransport(t)
	tr.MaxAttempts = 6
	tr.BaseDelay = 100 * time.Millisecond
	tr.MaxDelay = 300 * time.Millisecond
	var ceilings []time.Duration
	tr.jitter = func(ceiling time.Duration) time.Duration {
		ceilings = append(ceilings, ceiling)
		return ceiling / 2
	}
	resp := roundTrip(t, tr, newRequest(t, http.MethodPost, srv.URL, nil))

	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, 6, counter.attempts())
	ms := time.Millisecond
	assert.Equal(t, []time.Duration{100 * ms, 200 * ms, 300 * ms, 300 * ms, 300 * ms}, ceilings, "doubling, capped")
	assert.Equal(t, []time.Duration{50 * ms, 100 * ms, 150 * ms, 150 * ms, 150 * ms}, sleeper.recorded(), "the jittered waits")
}

func TestFullJitter(t *testing.T) {
	const ceiling = 10 * time.Millisecond
	var low, high bool
	for range 2000 {
		d := fullJitter(ceiling)
		require.GreaterOrEqual(t, d, time.Duration(0))
		require.LessOrEqual(t, d, ceiling)
		low = low || d < ceiling/4
		high = high || d > 3*ceiling/4
	}
	assert.True(t, low && high, "draws spread over the whole range")
	assert.Equal(t, time.Duration(0), fullJitter(0))
}

// onceReader is a body that cannot be replayed: http.NewRequest does not
// know how to rewind it, so GetBody stays nil.
type onceReader struct{ r io.Reader }

func (o *onceReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func TestTransportNonReplayableBody(t *testing.T) {
	t.Run("status", func(t *testing.T) {
		srv := unavailableThenOK(t, 100, func() string { return "" })
		tr, counter, sleeper := newTestTransport(t)
		req := newRequest(t, http.MethodPost, srv.URL, &onceReader{strings.NewReader("x")})
		require.Nil(t, req.GetBody)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		assert.Equal(t, 1, counter.attempts())
		assert.Empty(t, sleeper.recorded())
		assert.Regexp(t, uuidV4, counter.sentKeys()[0], "the key is sent all the same")
	})
	t.Run("network error", func(t *testing.T) {
		app := &orderHandler{}
		front := &lossyFront{next: idempotency.New(idempotency.Config{})(app), drop: 100}
		srv := httptest.NewServer(front)
		t.Cleanup(srv.Close)
		tr, counter, _ := newTestTransport(t)
		req := newRequest(t, http.MethodPost, srv.URL, &onceReader{strings.NewReader("x")})
		_, err := tr.RoundTrip(req)
		require.Error(t, err)
		assert.Equal(t, 1, counter.attempts())
		assert.Equal(t, int32(1), app.executions.Load())
	})
	t.Run("replayable body is sent whole each time", func(t *testing.T) {
		var mu sync.Mutex
		var bodies []string
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			mu.Lock()
			bodies = append(bodies, string(b))
			mu.Unlock()
			w.WriteHeader(http.StatusBadGateway)
		}))
		t.Cleanup(srv.Close)
		tr, _, _ := newTestTransport(t)
		tr.MaxAttempts = 3
		roundTrip(t, tr, newRequest(t, http.MethodPut, srv.URL, strings.NewReader("payload")))
		mu.Lock()
		defer mu.Unlock()
		assert.Equal(t, []string{"payload", "payload", "payload"}, bodies)
	})
}

func TestTransportContextCancellation(t *testing.T) {
	t.Run("cancelled during a wait", func(t *testing.T) {
		srv := unavailableThenOK(t, 100, func() string { return "" })
		tr, counter, sleeper := newTestTransport(t)
		ctx, cancel := context.WithCancel(testContext(t))
		defer cancel()
		sleeper.before = func(int) { cancel() }
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, nil)
		require.NoError(t, err)
		resp, err := tr.RoundTrip(req)
		require.ErrorIs(t, err, context.Canceled)
		assert.Nil(t, resp)
		assert.Equal(t, 1, counter.attempts())
		assert.Len(t, sleeper.recorded(), 1)
	})
	t.Run("a real wait ends with the context", func(t *testing.T) {
		var arrivals atomic.Int32
		arrived := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if arrivals.Add(1) == 1 {
				close(arrived)
			}
			w.WriteHeader(http.StatusServiceUnavailable)
		}))
		t.Cleanup(srv.Close)
		tr, counter, _ := newTestTransport(t)
		tr.sleep = nil // the real one
		tr.BaseDelay, tr.MaxDelay = time.Hour, time.Hour
		tr.jitter = func(ceiling time.Duration) time.Duration { return ceiling }
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		go func() {
			<-arrived
			cancel()
		}()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, nil)
		require.NoError(t, err)
		done := make(chan error, 1)
		go func() {
			resp, err := tr.RoundTrip(req)
			if resp != nil {
				_ = resp.Body.Close()
			}
			done <- err
		}()
		select {
		case err := <-done:
			require.ErrorIs(t, err, context.Canceled)
		case <-time.After(20 * time.Second):
			t.Fatal("RoundTrip still waiting an hour after its context was cancelled")
		}
		assert.Equal(t, 1, counter.attempts())
	})
	t.Run("a cancelled request is not retried", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
		t.Cleanup(srv.Close)
		tr, counter, sleeper := newTestTransport(t)
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, nil)
		require.NoError(t, err)
		_, err = tr.RoundTrip(req)
		require.ErrorIs(t, err, context.Canceled)
		assert.Equal(t, 1, counter.attempts())
		assert.Empty(t, sleeper.recorded())
	})
}

func TestTransportKeys(t *testing.T) {
	type seen struct{ method, key string }
	newServer := func(t *testing.T) (*httptest.Server, func() []seen) {
		t.Helper()
		var mu sync.Mutex
		var got []seen
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			got = append(got, seen{r.Method, r.Header.Get("Idempotency-Key") + r.Header.Get("X-Request-Key")})
			mu.Unlock()
			w.WriteHeader(http.StatusServiceUnavailable)
		}))
		t.Cleanup(srv.Close)
		return srv, func() []seen {
			mu.Lock()
			defer mu.Unlock()
			return append([]seen(nil), got...)
		}
	}
	t.Run("the caller's key is kept", func(t *testing.T) {
		srv, got := newServer(t)
		tr, _, _ := newTestTransport(t)
		tr.MaxAttempts = 2
		req := newRequest(t, http.MethodPatch, srv.URL, nil)
		req.Header.Set("Idempotency-Key", "order-7")
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		_ = resp.Body.Close()
		assert.Equal(t, []seen{{"PATCH", "order-7"}, {"PATCH", "order-7"}}, got())
	})
	t.Run("custom header name", func(t *testing.T) {
		srv, got := newServer(t)
		tr, _, _ := newTestTransport(t)
		tr.HeaderName = "X-Request-Key"
		tr.MaxAttempts = 1
		req := newRequest(t, http.MethodPost, srv.URL, nil)
		roundTrip(t, tr, req)
		s := got()
		require.Len(t, s, 1)
		assert.Regexp(t, uuidV4, s[0].key)
		assert.Empty(t, req.Header.Get("X-Request-Key"))
	})
	t.Run("uncovered methods pass through", func(t *testing.T) {
		srv, got := newServer(t)
		tr, _, sleeper := newTestTransport(t)
		for _, m := range []string{http.MethodGet, http.MethodDelete} {
			roundTrip(t, tr, newRequest(t, m, srv.URL, nil))
		}
		assert.Equal(t, []seen{{"GET", ""}, {"DELETE", ""}}, got(), "no key and no retry")
		assert.Empty(t, sleeper.recorded())
	})
	t.Run("custom methods", func(t *testing.T) {
		srv, got := newServer(t)
		tr, _, _ := newTestTransport(t)
		tr.Methods = []string{"delete"}
		tr.MaxAttempts = 2
		for _, m := range []string{http.MethodDelete, http.MethodPost} {
			roundTrip(t, tr, newRequest(t, m, srv.URL, nil))
		}
		s := got()
		require.Len(t, s, 3)
		assert.Equal(t, "DELETE", s[0].method)
		assert.Regexp(t, uuidV4, s[0].key)
		assert.Equal(t, s[0], s[1])
		assert.Equal(t, seen{"POST", ""}, s[2])
	})
}

func TestNewKey(t *testing.T) {
	seenKeys := make(map[string]bool)
	for range 1000 {
		k := NewKey()
		require.Regexp(t, uuidV4, k)
		require.False(t, seenKeys[k], "duplicate key %s", k)
		seenKeys[k] = true
	}
}

func TestRetryAfterParse(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"", 0, false},
		{"0", 0, true},
		{"7", 7 * time.Second, true},
		{"-1", 0, false},
		{"1.5", 0, false},
		{"soon", 0, false},
		{"99999999999999999", time.Duration(1<<62/time.Second) * time.Second, true},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second, true},
		{now.Add(-time.Hour).Format(http.TimeFormat), 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, ok := retryAfter(tt.in, now)
			assert.Equal(t, tt.ok, ok)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestDefaultsMatchMiddleware(t *testing.T) {
	assert.Equal(t, "Idempotency-Key", DefaultHeaderName)
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#", DefaultProblemTypeBase)
	assert.Equal(t, idempotency.ProblemInProgress, ProblemInProgress)
}

// errorTransport fails every attempt with err.
type errorTransport struct {
	err      error
	attempts atomic.Int32
}

func (e *errorTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	e.attempts.Add(1)
	if r.Body != nil {
		_ = r.Body.Close()
	}
	return nil, e.err
}

func TestTransportGetBodyError(t *testing.T) {
	base := &errorTransport{err: errors.New("connection reset")}
	sleeper := &fakeSleeper{}
	tr := &Transport{Base: base, sleep: sleeper.sleep}
	req := newRequest(t, http.MethodPost, "http://127.0.0.1:1/", strings.NewReader("x"))
	rewind := errors.New("cannot rewind")
	req.GetBody = func() (io.ReadCloser, error) { return nil, rewind }
	_, err := tr.RoundTrip(req)
	require.ErrorIs(t, err, rewind)
	assert.Equal(t, int32(1), base.attempts.Load())
}

// idleCloser records that CloseIdleConnections reached it.
type idleCloser struct {
	http.RoundTripper
	closed atomic.Bool
}

func (c *idleCloser) CloseIdleConnections() { c.closed.Store(true) }

func TestTransportCloseIdleConnections(t *testing.T) {
	base := &idleCloser{RoundTripper: http.DefaultTransport}
	c := &http.Client{Transport: &Transport{Base: base}}
	c.CloseIdleConnections()
	assert.True(t, base.closed.Load())
}
