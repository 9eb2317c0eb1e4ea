package idempotency_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"time"

	"github.com/f8e778d0/idempotency"
)

// routesCreate is the handler of the route examples: each execution
// creates a resource with the next number under prefix.
func routesCreate(prefix string) http.Handler {
	var next atomic.Int64
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":"%s_%d"}`, prefix, next.Add(1))
	})
}

// routesPost sends a POST to path through h with the given key (none when
// empty) and prints what came back.
func routesPost(h http.Handler, path, key string) {
	r := httptest.NewRequest(http.MethodPost, path, strings.NewReader(`{}`))
	r.Header.Set("Content-Type", "application/json")
	if key != "" {
		r.Header.Set("Idempotency-Key", key)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	body := strings.TrimSpace(w.Body.String())
	if w.Header().Get("Content-Type") == "application/problem+json" {
		body = "problem"
	}
	fmt.Printf("%s %d %s replayed=%t\n", path, w.Code, body, w.Header().Get(idempotency.ReplayedHeader) == "true")
}

// A router-wide instance covers every route, keys optional; a group of
// routes that must never run unprotected is wrapped in a second instance
// with RequireKey. A request the router-wide instance claimed passes
// straight through the group's instance: one claim, one execution, and the
// retry is replayed. A request without a key passes the router-wide
// instance and is refused by the group's.
func ExampleNew_routeGroup() {
	store := idempotency.NewMemoryStore()
	everywhere := idempotency.New(idempotency.Config{Store: store})
	required := idempotency.New(idempotency.Config{Store: store, RequireKey: true})

	payments := http.NewServeMux() // the group
	payments.Handle("POST /payments/card", routesCreate("pay"))

	mux := http.NewServeMux()
	mux.Handle("POST /orders", routesCreate("ord"))
	mux.Handle("/payments/", required(payments))
	h := everywhere(mux)

	routesPost(h, "/orders", "")               // keys are optional here
	routesPost(h, "/payments/card", "k-pay-1") // claimed by the outer instance
	routesPost(h, "/payments/card", "k-pay-1") // the retry
	routesPost(h, "/payments/card", "")        // the group requires a key
	// Output:
	// /orders 201 {"id":"ord_1"} replayed=false
	// /payments/card 201 {"id":"pay_1"} replayed=false
	// /payments/card 201 {"id":"pay_1"} replayed=true
	// /payments/card 400 problem replayed=false
}

// Routes with different needs get instances of their own, sharing one
// store: payments are replayed for a week and require a key, orders for an
// hour. A key is one key across the routes that share a store (the
// storage key is made of scope and key, not the path): sent to another
// route it is a different request, 422.
func ExampleNew_perRoute() {
	store := idempotency.NewMemoryStore()
	paymentsMW := idempotency.New(idempotency.Config{Store: store, TTL: 7 * 24 * time.Hour, RequireKey: true})
	ordersMW := idempotency.New(idempotency.Config{Store: store, TTL: time.Hour})

	mux := http.NewServeMux()
	mux.Handle("POST /payments", paymentsMW(routesCreate("pay")))
	mux.Handle("POST /orders", ordersMW(routesCreate("ord")))

	routesPost(mux, "/payments", "k-1")
	routesPost(mux, "/payments", "k-1")
	routesPost(mux, "/orders", "k-2")
	routesPost(mux, "/orders", "k-1") // k-1 belongs to a payment
	// Output:
	// /payments 201 {"id":"pay_1"} replayed=false
	// /payments 201 {"id":"pay_1"} replayed=true
	// /orders 201 {"id":"ord_1"} replayed=false
	// /orders 422 problem replayed=false
}
