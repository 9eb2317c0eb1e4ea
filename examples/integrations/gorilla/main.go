// Command gorilla serves an orders API on a gorilla/mux router, with the
// idempotency middleware installed with Use on the /api subrouter only.
//
//	go run ./gorilla -addr localhost:8080
//	curl -i -X POST -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' localhost:8080/api/orders -d '{"item":"book"}'
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"sync/atomic"

	"github.com/gorilla/mux"

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

// newRouter returns the service: the API under /api, protected by the
// middleware, and a health check and a webhook receiver outside it.
func newRouter(store idempotency.Store) http.Handler {
	var orders, webhooks atomic.Int64

	r := mux.NewRouter()
	r.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	}).Methods(http.MethodGet)
	// Webhooks have their own delivery IDs and are not covered.
	r.HandleFunc("/webhooks", func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintf(w, "webhook %d\n", webhooks.Add(1))
	}).Methods(http.MethodPost)

	api := r.PathPrefix("/api").Subrouter()
	// gorilla/mux runs a subrouter's middleware only for the routes it
	// matched, so a 404 or 405 never touches the store.
	api.Use(idempotency.New(idempotency.Config{Store: store, RequireKey: true}))
	api.HandleFunc("/orders", func(w http.ResponseWriter, r *http.Request) {
		location := fmt.Sprintf("/api/orders/%d", orders.Add(1))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", location)
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(map[string]string{"location": location})
	}).Methods(http.MethodPost)
	return r
}
