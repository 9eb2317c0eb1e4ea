package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// ordersTestDelay is the handler's work time in tests: long enough for the
// concurrent duplicates to overlap, short enough to keep the tests fast.
const ordersTestDelay = 50 * time.Millisecond

// ordersOutcomes records the middleware's events, as an Observer.
type ordersOutcomes struct {
	mu     sync.Mutex
	counts map[idempotency.Outcome]int
}

func (o *ordersOutcomes) observe(e idempotency.Event) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.counts[e.Outcome]++
}

func (o *ordersOutcomes) count(outcome idempotency.Outcome) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.counts[outcome]
}

// newOrdersServer serves the orders API on an httptest server.
func newOrdersServer(t *testing.T) (*httptest.Server, *orderAPI, *ordersOutcomes) {
	t.Helper()
	store := idempotency.NewMemoryStore()
	t.Cleanup(func() { _ = store.Close() })
	api := &orderAPI{delay: ordersTestDelay}
	events := &ordersOutcomes{counts: make(map[idempotency.Outcome]int)}
	srv := httptest.NewServer(newRoutes(api, store, events.observe))
	t.Cleanup(srv.Close)
	return srv, api, events
}

// ordersContext bounds a test so that a hang fails instead of blocking.
func ordersContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestOrdersScenarios(t *testing.T) {
	srv, api, events := newOrdersServer(t)
	rep, err := runScenarios(ordersContext(t), srv.Client(), srv.URL)
	require.NoError(t, err)

	t.Run("first POST creates the order", func(t *testing.T) {
		assert.Equal(t, http.StatusCreated, rep.first.status)
		assert.False(t, rep.first.replayed)
		require.NotNil(t, rep.first.order)
		assert.Equal(t, order{ID: 1, Item: "book", Quantity: 1}, *rep.first.order)
		assert.Equal(t, "/orders/1", rep.first.location)
	})

	t.Run("retry with the same key is replayed", func(t *testing.T) {
		assert.Equal(t, http.StatusCreated, rep.retry.status)
		assert.True(t, rep.retry.replayed)
		assert.Equal(t, string(rep.first.respBody), string(rep.retry.respBody))
		require.NotNil(t, rep.retry.order)
		assert.Equal(t, 1, rep.retry.order.ID)
		assert.Equal(t, rep.first.location, rep.retry.location)
	})

	t.Run("concurrent duplicates execute once", func(t *testing.T) {
		require.Len(t, rep.concurrent, concurrentDuplicates)
		var executed []outcome
		for _, o := range rep.concurrent {
			if o.executed() {
				executed = append(executed, o)
			}
		}
		require.Len(t, executed, 1, "exactly one duplicate runs the handler")
		winner := executed[0]
		assert.Equal(t, order{ID: 2, Item: "pen", Quantity: 3}, *winner.order)
		for _, o := range rep.concurrent {
			switch {
			case o.executed():
			case o.status == http.StatusConflict:
				require.NotNil(t, o.problem, o.scenario)
				assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemInProgress, o.problem.Type, o.scenario)
				assert.Equal(t, "A request with this Idempotency-Key is already in progress", o.problem.Detail, o.scenario)
				assert.False(t, o.replayed, o.scenario)
			default:
				// Sent after the winner finished: the stored response.
				assert.Equal(t, http.StatusCreated, o.status, o.scenario)
				assert.True(t, o.replayed, o.scenario)
				assert.Equal(t, string(winner.respBody), string(o.respBody), o.scenario)
			}
		}
	})

	t.Run("same key with a different body is refused", func(t *testing.T) {
		assert.Equal(t, http.StatusUnprocessableEntity, rep.mismatch.status)
		require.NotNil(t, rep.mismatch.problem)
		assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyReused, rep.mismatch.problem.Type)
		assert.False(t, rep.mismatch.replayed)
	})

	t.Run("missing key on the strict route is refused", func(t *testing.T) {
		assert.Equal(t, http.StatusBadRequest, rep.missingKey.status)
		require.NotNil(t, rep.missingKey.problem)
		assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyRequired, rep.missingKey.problem.Type)
		assert.Equal(t, "Idempotency-Key header is required", rep.missingKey.problem.Detail)
	})

	t.Run("orders created", func(t *testing.T) {
		assert.Equal(t, ordersExpected, rep.created, "as listed by GET /orders")
		assert.Equal(t, ordersExpected, api.count(), "as stored by the API")
		assert.Equal(t, ordersExpected, events.count(idempotency.OutcomeExecuted), "as seen by the observer")
		assert.Equal(t, 1, events.count(idempotency.OutcomeMismatch))
		assert.Equal(t, 1, events.count(idempotency.OutcomeKeyMissing))
		assert.Equal(t, 1+concurrentDuplicates-1,
			events.count(idempotency.OutcomeReplayed)+events.count(idempotency.OutcomeConflict),
			"the retry and every losing duplicate are replayed or refused")
	})

	assert.NoError(t, rep.check())
}

func TestOrdersDemo(t *testing.T) {
	var out bytes.Buffer
	err := runDemo(ordersContext(t), &out, ordersTestDelay)
	require.NoError(t, err, out.String())

	text := out.String()
	assert.Contains(t, text, "SCENARIO")
	assert.Contains(t, text, "orders created: 2 (expected 2)")
	for _, scenario := range []string{"first POST", "retry, same key", "concurrent #10", "same key, other body", "missing required key"} {
		assert.Contains(t, text, scenario)
	}
	assert.NotContains(t, text, "FAILED")
}

// TestOrdersReportCheck proves that the demo's invariant check fails when
// the middleware misbehaves, so `-demo` exits non-zero on a regression.
func TestOrdersReportCheck(t *testing.T) {
	srv, _, _ := newOrdersServer(t)
	good, err := runScenarios(ordersContext(t), srv.Client(), srv.URL)
	require.NoError(t, err)
	require.NoError(t, good.check())

	tests := []struct {
		name   string
		mutate func(r *demoReport)
	}{
		{"retry not replayed", func(r *demoReport) { r.retry.replayed = false }},
		{"retry with another body", func(r *demoReport) { r.retry.respBody = []byte(`{"id":9}`) }},
		{"duplicate executed twice", func(r *demoReport) {
			for i := range r.concurrent {
				r.concurrent[i] = r.first // every duplicate "created" an order
			}
		}},
		{"no duplicate executed", func(r *demoReport) {
			for i := range r.concurrent {
				r.concurrent[i].status = http.StatusConflict
				r.concurrent[i].replayed = false
			}
		}},
		{"duplicate got a 5xx", func(r *demoReport) { r.concurrent[0].status = http.StatusServiceUnavailable }},
		{"mismatch accepted", func(r *demoReport) { r.mismatch.status = http.StatusCreated }},
		{"missing key accepted", func(r *demoReport) { r.missingKey.status = http.StatusCreated }},
		{"extra order", func(r *demoReport) { r.created++ }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := *good
			r.concurrent = append([]outcome(nil), good.concurrent...)
			tt.mutate(&r)
			assert.ErrorIs(t, r.check(), errInvariant)
		})
	}
}

func TestOrdersCreateValidation(t *testing.T) {
	srv, api, _ := newOrdersServer(t)
	tests := []struct {
		name, body, detail string
	}{
		{"not JSON", `book`, `The body must be a JSON object such as {"item":"book","quantity":1}`},
		{"unknown field", `{"item":"book","quantity":1,"price":5}`, `The body must be a JSON object such as {"item":"book","quantity":1}`},
		{"no item", `{"quantity":1}`, "item is required"},
		{"zero quantity", `{"item":"book","quantity":0}`, "quantity must be between 1 and 100"},
		{"too many", `{"item":"book","quantity":101}`, "quantity must be between 1 and 100"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := srv.Client().Post(srv.URL+"/orders", "application/json", strings.NewReader(tt.body))
			require.NoError(t, err)
			defer resp.Body.Close()
			assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
			assert.Equal(t, "application/problem+json", resp.Header.Get("Content-Type"))
			var p idempotency.Problem
			require.NoError(t, json.NewDecoder(resp.Body).Decode(&p))
			assert.Equal(t, "about:blank", p.Type)
			assert.Equal(t, tt.detail, p.Detail)
		})
	}
	assert.Zero(t, api.count())
}

// TestOrdersWithoutKey shows the optional-key route: without a key the
// middleware stays out of the way and every request creates an order.
func TestOrdersWithoutKey(t *testing.T) {
	srv, _, _ := newOrdersServer(t)
	client := srv.Client()
	for range 2 {
		resp, err := client.Post(srv.URL+"/orders", "application/json", strings.NewReader(`{"item":"book","quantity":1}`))
		require.NoError(t, err)
		_ = resp.Body.Close()
		assert.Equal(t, http.StatusCreated, resp.StatusCode)
		assert.Empty(t, resp.Header.Get(idempotency.ReplayedHeader))
	}

	resp, err := client.Get(srv.URL + "/orders")
	require.NoError(t, err)
	defer resp.Body.Close()
	var orders []order
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&orders))
	assert.Equal(t, []order{{ID: 1, Item: "book", Quantity: 1}, {ID: 2, Item: "book", Quantity: 1}}, orders)

	for path, status := range map[string]int{"/orders/2": http.StatusOK, "/orders/3": http.StatusNotFound, "/orders/x": http.StatusNotFound} {
		resp, err := client.Get(srv.URL + path)
		require.NoError(t, err, path)
		_ = resp.Body.Close()
		assert.Equal(t, status, resp.StatusCode, path)
	}
}
