// Command chi serves an orders API on a chi router with the idempotency
// middleware installed for every route with r.Use, and a route group,
// payments, in which a key is required.
//
//	go run ./chi -addr localhost:8080
//	curl -i -X POST -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' localhost:8080/payments -d '{"amount":100}'
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"sync/atomic"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"

	"github.com/f8e778d0/idempotency"
)

func main() {
	addr := flag.String("addr", "localhost:8080", "address to listen on")
	flag.Parse()

	store := idempotency.NewMemoryStore()
	defer store.Close()
	log.Printf("listening on %s", *addr)
	log.Fatal(http.ListenAndServe(*addr, newRouter(store)))
}

// newRouter returns the API: idempotency for every POST, PUT and PATCH
// (keys optional), and a payments group where a key is required.
func newRouter(store idempotency.Store) http.Handler {
	var orders, payments atomic.Int64

	r := chi.NewRouter()
	// Recoverer goes outside the idempotency middleware, so that a panic
	// releases the key before it is recovered.
	r.Use(middleware.Recoverer)
	r.Use(idempotency.New(idempotency.Config{Store: store}))

	r.Get("/health", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	// Keys are optional here: a request with one is safe to retry, one
	// without runs every time.
	r.Post("/orders", func(w http.ResponseWriter, r *http.Request) {
		writeCreated(w, fmt.Sprintf("/orders/%d", orders.Add(1)))
	})

	r.Group(func(r chi.Router) {
		// Money moves here: refuse requests that could not be retried
		// safely. The group's own instance, on the same store, lets
		// through the requests the router-wide one has claimed and
		// answers 400 to those without a key.
		r.Use(idempotency.New(idempotency.Config{Store: store, RequireKey: true}))
		r.Post("/payments", func(w http.ResponseWriter, r *http.Request) {
			writeCreated(w, fmt.Sprintf("/payments/%d", payments.Add(1)))
		})
	})
	return r
}

// writeCreated answers 201 for a new resource at location.
func writeCreated(w http.ResponseWriter, location string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", location)
	w.WriteHeader(http.StatusCreated)
	_ = json.NewEncoder(w).Encode(map[string]string{"location": location})
}
