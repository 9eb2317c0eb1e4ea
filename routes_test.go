package idempotency_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
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

// routesEvents collects the events an instance reports.
type routesEvents struct {
	mu     sync.Mutex
	events []idempotency.Event
}

func (e *routesEvents) observe(ev idempotency.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.events = append(e.events, ev)
}

// take returns the events reported since the last take.
func (e *routesEvents) take() []idempotency.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := e.events
	e.events = nil
	return out
}

// routesResult is what a client saw.
type routesResult struct {
	status   int
	body     string
	header   http.Header
	replayed bool
}

// problemType returns the type member of a problem response, or "".
func (r routesResult) problemType() string {
	if r.header.Get("Content-Type") != "application/problem+json" {
		return ""
	}
	var p struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal([]byte(r.body), &p)
	return p.Type
}

// routesPostURL posts to url with key (none when empty) and fails the test
// if no response came back.
func routesPostURL(t *testing.T, url, key string) routesResult {
	t.Helper()
	r, err := routesTry(t.Context(), url, key)
	require.NoError(t, err)
	return r
}

// routesTry posts to url with key (none when empty); safe to call from any
// goroutine.
func routesTry(ctx context.Context, url, key string) (routesResult, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(`{"amount":100}`))
	if err != nil {
		return routesResult{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return routesResult{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return routesResult{
		status:   resp.StatusCode,
		body:     string(body),
		header:   resp.Header,
		replayed: resp.Header.Get(idempotency.ReplayedHeader) == "true",
	}, err
}

// routesOutcomes returns the outcomes of events, in order.
func routesOutcomes(events []idempotency.Event) []string {
	out := make([]string, 0, len(events))
	for _, e := range events {
		out = append(out, e.Outcome.String())
	}
	return out
}

// A router-wide instance and a route group's own instance with RequireKey,
// on one store: the group's instance lets through what the router-wide one
// claimed (one claim, one execution, the retry replayed, concurrent
// duplicates answered 409 once by the outer instance and never by the inner
// one against itself), and refuses a keyless request that the router-wide
// one let pass.
func TestRoutesNestedGroup(t *testing.T) {
	store := idempotency.NewMemoryStore()
	var outerEv, innerEv routesEvents
	outer := idempotency.New(idempotency.Config{Store: store, Observer: outerEv.observe})
	inner := idempotency.New(idempotency.Config{Store: store, RequireKey: true, Observer: innerEv.observe})

	var payRuns, orderRuns atomic.Int64
	gate := make(chan struct{})
	var gateOnce sync.Once
	openGate := func() { gateOnce.Do(func() { close(gate) }) }
	t.Cleanup(openGate)

	group := http.NewServeMux()
	group.HandleFunc("POST /payments/{kind}", func(w http.ResponseWriter, r *http.Request) {
		key, ok := idempotency.KeyFromContext(r.Context())
		if r.PathValue("kind") == "slow" {
			<-gate
		}
		_, _ = io.ReadAll(r.Body)
		n := payRuns.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", fmt.Sprintf("/payments/%d", n))
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"payment":%d,"key_seen":%t,"key":%q}`, n, ok, key)
	})
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		orderRuns.Add(1)
		w.WriteHeader(http.StatusCreated)
	})
	mux.Handle("/payments/", inner(group))
	srv := httptest.NewServer(outer(mux))
	t.Cleanup(srv.Close)

	t.Run("claimed by the outer instance, passed through by the inner one", func(t *testing.T) {
		first := routesPostURL(t, srv.URL+"/payments/card", "pay-1")
		require.Equal(t, http.StatusCreated, first.status, first.body)
		assert.False(t, first.replayed)
		assert.JSONEq(t, `{"payment":1,"key_seen":true,"key":"pay-1"}`, first.body)

		retry := routesPostURL(t, srv.URL+"/payments/card", "pay-1")
		require.Equal(t, http.StatusCreated, retry.status, retry.body)
		assert.True(t, retry.replayed)
		assert.Equal(t, first.body, retry.body, "replayed byte for byte")
		assert.Equal(t, "/payments/1", retry.header.Get("Location"))
		assert.EqualValues(t, 1, payRuns.Load(), "one execution")

		assert.Equal(t, []string{"executed", "replayed"}, routesOutcomes(outerEv.take()))
		assert.Empty(t, innerEv.take(), "the inner instance neither claims nor reports a request the outer one holds")
	})

	t.Run("concurrent duplicates run once", func(t *testing.T) {
		const n = 8
		before := payRuns.Load()
		results := make(chan routesResult, n)
		firstIn := make(chan routesResult, 1)
		go func() {
			r, err := routesTry(t.Context(), srv.URL+"/payments/slow", "pay-2")
			assert.NoError(t, err)
			firstIn <- r
		}()
		require.Eventually(t, func() bool {
			rec, err := store.Get(t.Context(), idempotency.StorageKey("", "pay-2"))
			return err == nil && rec != nil
		}, 5*time.Second, time.Millisecond, "the first request claims the key")

		var wg sync.WaitGroup
		for range n - 1 {
			wg.Go(func() {
				r, err := routesTry(t.Context(), srv.URL+"/payments/slow", "pay-2")
				assert.NoError(t, err)
				results <- r
			})
		}
		wg.Wait()
		close(results)
		inProgress := "https://github.com/f8e778d0/idempotency#" + idempotency.ProblemInProgress
		for r := range results {
			assert.Equal(t, http.StatusConflict, r.status, r.body)
			assert.Equal(t, inProgress, r.problemType())
		}
		openGate()
		first := <-firstIn
		require.Equal(t, http.StatusCreated, first.status, first.body)
		assert.Equal(t, before+1, payRuns.Load(), "exactly one execution")

		retry := routesPostURL(t, srv.URL+"/payments/slow", "pay-2")
		assert.Equal(t, http.StatusCreated, retry.status, "the 409s were never stored as the key's result")
		assert.True(t, retry.replayed)
		assert.Equal(t, first.body, retry.body)

		for _, e := range innerEv.take() {
			assert.NotEqual(t, idempotency.OutcomeConflict, e.Outcome, "never a 409 against itself")
		}
		outerEv.take()
	})

	t.Run("a keyless request is refused by the group", func(t *testing.T) {
		before := payRuns.Load()
		none := routesPostURL(t, srv.URL+"/payments/card", "")
		assert.Equal(t, http.StatusBadRequest, none.status)
		assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyRequired, none.problemType())
		assert.Equal(t, before, payRuns.Load(), "the handler did not run")

		outerEvents, innerEvents := outerEv.take(), innerEv.take()
		require.Len(t, outerEvents, 1)
		assert.Equal(t, idempotency.OutcomeKeyMissing, outerEvents[0].Outcome)
		assert.Zero(t, outerEvents[0].Status, "the outer instance let it pass")
		require.Len(t, innerEvents, 1)
		assert.Equal(t, idempotency.OutcomeKeyMissing, innerEvents[0].Outcome)
		assert.Equal(t, http.StatusBadRequest, innerEvents[0].Status)
	})

	t.Run("a keyless request outside the group runs", func(t *testing.T) {
		none := routesPostURL(t, srv.URL+"/orders", "")
		assert.Equal(t, http.StatusCreated, none.status)
		assert.EqualValues(t, 1, orderRuns.Load())
		assert.Empty(t, innerEv.take())
		outerEv.take()
	})
}

// routesTTLStore records the TTL of every completion.
type routesTTLStore struct {
	idempotency.Store
	mu   sync.Mutex
	ttls map[string]time.Duration
}

func (s *routesTTLStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	s.mu.Lock()
	s.ttls[key] = ttl
	s.mu.Unlock()
	return s.Store.Complete(ctx, key, token, rec, ttl)
}

func (s *routesTTLStore) ttl(key string) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ttls[key]
}

// Separate instances per route on one store: each route's records are kept
// for its own TTL, each route requires or not its own key, and a key is one
// key across the routes (sent to another route, it is another request: 422).
func TestRoutesPerRouteInstances(t *testing.T) {
	store := &routesTTLStore{Store: idempotency.NewMemoryStore(), ttls: map[string]time.Duration{}}
	const paymentsTTL, ordersTTL = 7 * 24 * time.Hour, time.Hour
	payments := idempotency.New(idempotency.Config{Store: store, TTL: paymentsTTL, RequireKey: true})
	orders := idempotency.New(idempotency.Config{Store: store, TTL: ordersTTL})

	var runs atomic.Int64
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := runs.Add(1)
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, "%s %d", r.URL.Path, n)
	})
	mux := http.NewServeMux()
	mux.Handle("POST /payments", payments(h))
	mux.Handle("POST /orders", orders(h))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	for _, tt := range []struct {
		path, key string
		ttl       time.Duration
	}{
		{"/payments", "route-pay", paymentsTTL},
		{"/orders", "route-ord", ordersTTL},
	} {
		t.Run(tt.path, func(t *testing.T) {
			before := runs.Load()
			first := routesPostURL(t, srv.URL+tt.path, tt.key)
			require.Equal(t, http.StatusCreated, first.status, first.body)
			retry := routesPostURL(t, srv.URL+tt.path, tt.key)
			assert.True(t, retry.replayed)
			assert.Equal(t, first.body, retry.body)
			assert.Equal(t, before+1, runs.Load())
			assert.Equal(t, tt.ttl, store.ttl(idempotency.StorageKey("", tt.key)), "the route's own TTL")
		})
	}

	t.Run("keys required per route", func(t *testing.T) {
		before := runs.Load()
		assert.Equal(t, http.StatusBadRequest, routesPostURL(t, srv.URL+"/payments", "").status)
		assert.Equal(t, http.StatusCreated, routesPostURL(t, srv.URL+"/orders", "").status)
		assert.Equal(t, before+1, runs.Load())
	})

	t.Run("a key sent to another route", func(t *testing.T) {
		before := runs.Load()
		other := routesPostURL(t, srv.URL+"/orders", "route-pay")
		assert.Equal(t, http.StatusUnprocessableEntity, other.status)
		assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyReused, other.problemType())
		assert.Equal(t, before, runs.Load())
	})
}
