package client

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// A handler slower than the transport's ResponseHeaderTimeout: the first
// attempt times out while the handler runs, the retries find the key in
// flight (409) and then stored, and the caller gets the original response
// from one execution.
func TestTransportRetriesResponseHeaderTimeout(t *testing.T) {
	app := &orderHandler{release: make(chan struct{})}
	srv := httptest.NewServer(idempotency.New(idempotency.Config{})(app))
	t.Cleanup(srv.Close)

	base := &http.Transport{ResponseHeaderTimeout: 100 * time.Millisecond}
	t.Cleanup(base.CloseIdleConnections)
	counter := &attemptCounter{base: base}
	var mu sync.Mutex
	var errs []error
	tr := &Transport{
		Base:        recordErrors(counter, &mu, &errs),
		MaxAttempts: 10,
		BaseDelay:   20 * time.Millisecond,
		MaxDelay:    5 * time.Second,
	}
	// The handler finishes well after the first attempt gave up.
	time.AfterFunc(300*time.Millisecond, func() { close(app.release) })

	req := newRequest(t, http.MethodPost, srv.URL+"/orders", strings.NewReader(`{"item":"book"}`))
	resp := roundTrip(t, tr, req)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)

	assert.Equal(t, int32(1), app.executions.Load(), "one execution")
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, "/orders/1", resp.Header.Get("Location"))
	assert.JSONEq(t, `{"order":1,"request":"{\"item\":\"book\"}"}`, string(body), "the original response")
	assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader))

	mu.Lock()
	defer mu.Unlock()
	require.NotEmpty(t, errs)
	assert.ErrorIs(t, errs[0], context.DeadlineExceeded, "the first attempt timed out awaiting headers")
	keys := counter.sentKeys()
	require.GreaterOrEqual(t, len(keys), 2)
	for _, k := range keys {
		assert.Equal(t, keys[0], k, "one key for every attempt")
	}
}

// A dial that times out is the transport's own failure, not the caller's:
// it is retried.
func TestTransportRetriesDialTimeout(t *testing.T) {
	app := &orderHandler{}
	srv := httptest.NewServer(idempotency.New(idempotency.Config{})(app))
	t.Cleanup(srv.Close)

	var dials atomic.Int32
	var firstErr atomic.Value
	base := &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			d := &net.Dialer{}
			if dials.Add(1) == 1 {
				d.Timeout = time.Nanosecond // times out before it connects
				conn, err := d.DialContext(ctx, network, addr)
				if err != nil {
					firstErr.Store(err)
				}
				return conn, err
			}
			return d.DialContext(ctx, network, addr)
		},
	}
	t.Cleanup(base.CloseIdleConnections)
	sleeper := &fakeSleeper{}
	tr := &Transport{Base: base, sleep: sleeper.sleep}

	resp := roundTrip(t, tr, newRequest(t, http.MethodPost, srv.URL, strings.NewReader("x")))
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, int32(1), app.executions.Load())
	assert.Len(t, sleeper.recorded(), 1, "one retry")
	if err, ok := firstErr.Load().(error); assert.True(t, ok, "the first dial failed") {
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		assert.True(t, ne.Timeout(), "a timeout: %v", err)
	}
}

// When the transport gives up, its error carries the key every attempt was
// sent with, through http.Client's *url.Error too.
func TestTransportErrorCarriesKey(t *testing.T) {
	hang := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(hang) })

	newTransport := func(t *testing.T) (*Transport, *attemptCounter, *fakeSleeper) {
		base := &http.Transport{ResponseHeaderTimeout: 20 * time.Millisecond, DisableKeepAlives: true}
		t.Cleanup(base.CloseIdleConnections)
		counter := &attemptCounter{base: base}
		sleeper := &fakeSleeper{}
		return &Transport{Base: counter, MaxAttempts: 3, sleep: sleeper.sleep}, counter, sleeper
	}

	t.Run("generated key", func(t *testing.T) {
		tr, counter, _ := newTransport(t)
		resp, err := tr.RoundTrip(newRequest(t, http.MethodPost, srv.URL, strings.NewReader("x")))
		require.Error(t, err)
		assert.Nil(t, resp)
		var e *Error
		require.ErrorAs(t, err, &e)
		assert.Regexp(t, uuidV4, e.Key)
		assert.Equal(t, []string{e.Key, e.Key, e.Key}, counter.sentKeys())
		assert.Equal(t, 3, e.Attempts)
		assert.ErrorIs(t, err, context.DeadlineExceeded, "the cause is kept")
		assert.NotContains(t, err.Error(), e.Key, "the key stays out of the error text")
	})
	t.Run("the caller's key, through http.Client", func(t *testing.T) {
		tr, _, _ := newTransport(t)
		req := newRequest(t, http.MethodPost, srv.URL, strings.NewReader("x"))
		req.Header.Set(DefaultHeaderName, "order-42")
		_, err := (&http.Client{Transport: tr}).Do(req)
		var e *Error
		require.ErrorAs(t, err, &e)
		assert.Equal(t, "order-42", e.Key)
		assert.Equal(t, 3, e.Attempts)
	})
	t.Run("the caller's deadline is final", func(t *testing.T) {
		tr, counter, sleeper := newTransport(t)
		tr.Base.(*attemptCounter).base.ResponseHeaderTimeout = 0
		ctx, cancel := context.WithTimeout(testContext(t), 50*time.Millisecond)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, strings.NewReader("x"))
		require.NoError(t, err)
		_, err = tr.RoundTrip(req)
		var e *Error
		require.ErrorAs(t, err, &e)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, 1, counter.attempts(), "not retried")
		assert.Empty(t, sleeper.recorded())
		assert.Equal(t, counter.sentKeys()[0], e.Key)
	})
	t.Run("cancelled during a wait", func(t *testing.T) {
		tr, counter, sleeper := newTransport(t)
		ctx, cancel := context.WithCancel(testContext(t))
		defer cancel()
		sleeper.before = func(int) { cancel() }
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, strings.NewReader("x"))
		require.NoError(t, err)
		_, err = tr.RoundTrip(req)
		var e *Error
		require.ErrorAs(t, err, &e)
		assert.ErrorIs(t, err, context.Canceled)
		assert.Equal(t, 1, e.Attempts)
		assert.Equal(t, counter.sentKeys()[0], e.Key)
	})
	t.Run("a body that cannot be replayed", func(t *testing.T) {
		tr, _, _ := newTransport(t)
		rewind := errors.New("cannot rewind")
		req := newRequest(t, http.MethodPost, srv.URL, strings.NewReader("x"))
		req.GetBody = func() (io.ReadCloser, error) { return nil, rewind }
		req.Header.Set(DefaultHeaderName, "order-43")
		_, err := tr.RoundTrip(req)
		var e *Error
		require.ErrorAs(t, err, &e)
		assert.ErrorIs(t, err, rewind)
		assert.Equal(t, "order-43", e.Key)
		assert.Equal(t, 1, e.Attempts)
	})
}

// recordErrors wraps base and appends every error it returns to errs.
func recordErrors(base http.RoundTripper, mu *sync.Mutex, errs *[]error) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := base.RoundTrip(r)
		if err != nil {
			mu.Lock()
			*errs = append(*errs, err)
			mu.Unlock()
		}
		return resp, err
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
