package main

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/f8e778d0/idempotency"
)

// order is what the API creates and lists. CreatedBy names the instance
// that ran the request, so a replay on another instance shows where the
// order was really made.
type order struct {
	ID        int64  `json:"id"`
	Item      string `json:"item"`
	Quantity  int    `json:"quantity"`
	CreatedBy string `json:"created_by"`
}

// orderRequest is the body of POST /orders.
type orderRequest struct {
	Item     string `json:"item"`
	Quantity int    `json:"quantity"`
}

// orderAPI keeps its orders in Redis, so that every instance sharing the
// Redis sees the same ones. Nothing in it knows about idempotency keys.
type orderAPI struct {
	rdb      redis.UniversalClient
	prefix   string        // of every Redis key the example writes
	instance string        // this instance's name
	delay    time.Duration // how long creating an order takes
}

// newRoutes returns the API's routes. POST /orders goes through the
// idempotency middleware, whose records live in the same Redis under
// prefix + "idempotency:". Every instance must use the same prefix, or they
// would not see each other's keys.
func newRoutes(api *orderAPI, observer func(idempotency.Event)) http.Handler {
	mw := idempotency.New(idempotency.Config{
		Store:    idempotency.NewRedisStore(api.rdb, idempotency.WithKeyPrefix(api.prefix+"idempotency:")),
		Observer: observer,
	})
	mux := http.NewServeMux()
	mux.Handle("POST /orders", mw(http.HandlerFunc(api.create)))
	mux.HandleFunc("GET /orders", api.list)
	return mux
}

// create validates an order, takes a while to "process" it, saves it under
// the next id and answers 201 with the order and its Location. The
// middleware stores this response in Redis: a retry with the same key, on
// any instance, gets it back with X-Idempotent-Replayed: true.
func (a *orderAPI) create(w http.ResponseWriter, r *http.Request) {
	var req orderRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, r, http.StatusBadRequest, `The body must be a JSON object such as {"item":"book","quantity":1}`)
		return
	}
	if req.Item == "" || req.Quantity < 1 || req.Quantity > 100 {
		writeError(w, r, http.StatusBadRequest, "item is required and quantity must be between 1 and 100")
		return
	}

	ctx := r.Context()
	select {
	case <-time.After(a.delay): // stand-in for real work
	case <-ctx.Done():
		// The client went away, or the middleware lost the claim on the
		// key. Nothing was created; a 5xx is not stored, so a retry runs.
		writeError(w, r, http.StatusServiceUnavailable, "The request was cancelled before the order was created")
		return
	}

	// Two commands, kept simple for the example. A real service would write
	// the order in one transaction and pass the idempotency key
	// (idempotency.KeyFromContext) down to its database or payment
	// provider, which is what protects a crash between the write and the
	// storing of the response.
	id, err := a.rdb.Incr(ctx, a.prefix+"orders:next-id").Result()
	if err != nil {
		writeError(w, r, http.StatusServiceUnavailable, "The order could not be saved")
		return
	}
	o := order{ID: id, Item: req.Item, Quantity: req.Quantity, CreatedBy: a.instance}
	saved, _ := json.Marshal(o) // cannot fail: plain fields
	if err := a.rdb.RPush(ctx, a.prefix+"orders", saved).Err(); err != nil {
		writeError(w, r, http.StatusServiceUnavailable, "The order could not be saved")
		return
	}

	w.Header().Set("Location", "/orders/"+strconv.FormatInt(o.ID, 10))
	writeJSON(w, http.StatusCreated, o)
}

// list answers GET /orders with every order created by any instance.
func (a *orderAPI) list(w http.ResponseWriter, r *http.Request) {
	raw, err := a.rdb.LRange(r.Context(), a.prefix+"orders", 0, -1).Result()
	if err != nil {
		writeError(w, r, http.StatusServiceUnavailable, "The orders could not be read")
		return
	}
	orders := make([]json.RawMessage, len(raw))
	for i, s := range raw {
		orders[i] = json.RawMessage(s)
	}
	writeJSON(w, http.StatusOK, orders)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // fails only if the client went away
}

// writeError answers with an RFC 9457 problem, in the same format as the
// middleware's own errors.
func writeError(w http.ResponseWriter, r *http.Request, status int, detail string) {
	idempotency.WriteProblem(w, r, &idempotency.Problem{
		Type:   "about:blank",
		Title:  http.StatusText(status),
		Status: status,
		Detail: detail,
	})
}
