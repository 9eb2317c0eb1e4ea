package main

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/f8e778d0/idempotency"
)

// order is what the API creates and lists.
type order struct {
	ID       int    `json:"id"`
	Item     string `json:"item"`
	Quantity int    `json:"quantity"`
}

// orderRequest is the body of POST /orders and POST /checkout.
type orderRequest struct {
	Item     string `json:"item"`
	Quantity int    `json:"quantity"`
}

// orderAPI is the example's business logic: a list of orders in memory.
// Nothing in it knows about idempotency keys; the middleware in front of it
// makes its POST routes safe to retry.
type orderAPI struct {
	delay time.Duration // how long creating an order takes

	mu     sync.Mutex
	orders []order
}

// newRoutes returns the API's routes. Both POST routes go through the
// idempotency middleware and share one store:
//
//   - POST /orders accepts an Idempotency-Key; a request without one is
//     served unprotected, as a client that never retries would expect.
//   - POST /checkout places an order and (in a real shop) charges for it,
//     so a retry must never run twice: it requires the key and answers
//     400 without one.
//
// Sharing the store is safe: the fingerprint covers the path, so a key
// reused on the other route gets 422. An API with several users would also
// set KeyScope to the authenticated user, so that one user's key can never
// replay another user's response.
//
// Reads are not wrapped: GET is idempotent already, and the middleware
// would pass it through untouched anyway.
func newRoutes(api *orderAPI, store idempotency.Store, observer func(idempotency.Event)) http.Handler {
	optionalKey := idempotency.New(idempotency.Config{
		Store:    store,
		Observer: observer,
	})
	requiredKey := idempotency.New(idempotency.Config{
		Store:      store,
		RequireKey: true,
		Observer:   observer,
	})

	mux := http.NewServeMux()
	mux.Handle("POST /orders", optionalKey(http.HandlerFunc(api.create)))
	mux.Handle("POST /checkout", requiredKey(http.HandlerFunc(api.create)))
	mux.HandleFunc("GET /orders", api.list)
	mux.HandleFunc("GET /orders/{id}", api.get)
	return mux
}

// create decodes and validates an order, takes a while to "process" it,
// then stores it under the next id and answers 201 with the order and its
// Location. The middleware stores this response: a retry with the same key
// gets it back byte for byte, with X-Idempotent-Replayed: true, and the
// handler does not run again.
func (a *orderAPI) create(w http.ResponseWriter, r *http.Request) {
	var req orderRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, r, http.StatusBadRequest, "The body must be a JSON object such as {\"item\":\"book\",\"quantity\":1}")
		return
	}
	switch {
	case req.Item == "":
		writeError(w, r, http.StatusBadRequest, "item is required")
		return
	case req.Quantity < 1 || req.Quantity > 100:
		writeError(w, r, http.StatusBadRequest, "quantity must be between 1 and 100")
		return
	}
	// A 400 is a final answer about this request, so the middleware stores
	// and replays it like a 201: retrying the same bad body cannot succeed.

	// Stand-in for real work (a database write, a payment). It is what
	// makes concurrent duplicates overlap in the demo.
	select {
	case <-time.After(a.delay):
	case <-r.Context().Done():
		// The client went away, or the middleware lost the claim on the key
		// (errors.Is(context.Cause(ctx), idempotency.ErrLeaseLost)). Nothing
		// was created, and a 5xx is not stored, so a retry runs again.
		writeError(w, r, http.StatusServiceUnavailable, "The request was cancelled before the order was created")
		return
	}

	a.mu.Lock()
	o := order{ID: len(a.orders) + 1, Item: req.Item, Quantity: req.Quantity}
	a.orders = append(a.orders, o)
	a.mu.Unlock()

	w.Header().Set("Location", "/orders/"+strconv.Itoa(o.ID))
	writeJSON(w, http.StatusCreated, o)
}

// list answers GET /orders with every order created so far.
func (a *orderAPI) list(w http.ResponseWriter, _ *http.Request) {
	a.mu.Lock()
	orders := append([]order{}, a.orders...)
	a.mu.Unlock()
	writeJSON(w, http.StatusOK, orders)
}

// get answers GET /orders/{id}, where the Location of a new order points.
func (a *orderAPI) get(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.Atoi(r.PathValue("id"))
	a.mu.Lock()
	var o order
	found := err == nil && id >= 1 && id <= len(a.orders)
	if found {
		o = a.orders[id-1]
	}
	a.mu.Unlock()
	if !found {
		writeError(w, r, http.StatusNotFound, "No such order")
		return
	}
	writeJSON(w, http.StatusOK, o)
}

// count returns how many orders were created.
func (a *orderAPI) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.orders)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // fails only if the client went away
}

// writeError answers with an RFC 9457 problem, in the same format as the
// middleware's own errors, so a client parses one kind of error body.
func writeError(w http.ResponseWriter, r *http.Request, status int, detail string) {
	idempotency.WriteProblem(w, r, &idempotency.Problem{
		Type:   "about:blank",
		Title:  http.StatusText(status),
		Status: status,
		Detail: detail,
	})
}
