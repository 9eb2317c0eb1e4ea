package idempotency_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/f8e778d0/idempotency"
)

// exampleOrders is the application in the examples: each execution creates
// an order with the next number.
func exampleOrders() http.Handler {
	var next atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		var order struct{ Item string }
		if err := json.NewDecoder(r.Body).Decode(&order); err != nil {
			http.Error(w, "malformed order", http.StatusBadRequest)
			return
		}
		id := next.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", fmt.Sprintf("/orders/%d", id))
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":%d}`, id)
	})
	return mux
}

// examplePost sends a POST through h with the given key (none when empty)
// and user, and prints what came back.
func examplePost(h http.Handler, key, user string) {
	r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{"item":"book"}`))
	r.Header.Set("Content-Type", "application/json")
	if key != "" {
		r.Header.Set("Idempotency-Key", key)
	}
	if user != "" {
		r.Header.Set("X-User", user)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	replayed := w.Header().Get(idempotency.ReplayedHeader)
	if replayed == "" {
		replayed = "false"
	}
	fmt.Printf("%d %s replayed=%s\n", w.Code, strings.TrimSpace(w.Body.String()), replayed)
}

// The zero Config protects POST, PUT and PATCH with an in-memory store: a
// retry with the same key gets the stored response, and the handler runs
// once.
func ExampleNew() {
	mw := idempotency.New(idempotency.Config{})
	h := mw(exampleOrders()) // or http.ListenAndServe(":8080", mw(mux))

	examplePost(h, "8e03978e-40d5-43e8-bc93-6894a57f9324", "")
	examplePost(h, "8e03978e-40d5-43e8-bc93-6894a57f9324", "") // the retry
	examplePost(h, "1f0c2b5e-7a8d-4c3e-9b2a-0d4e5f6a7b8c", "") // a new order
	// Output:
	// 201 {"id":1} replayed=false
	// 201 {"id":1} replayed=true
	// 201 {"id":2} replayed=false
}

// With RequireKey, a POST, PUT or PATCH without a key is refused with an
// RFC 9457 problem instead of running unprotected.
func ExampleConfig_requireKey() {
	h := idempotency.New(idempotency.Config{RequireKey: true})(exampleOrders())

	r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{"item":"book"}`))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	fmt.Println(w.Code, w.Header().Get("Content-Type"))
	fmt.Println(w.Body.String())
	// Output:
	// 400 application/problem+json
	// {"type":"https://github.com/f8e778d0/idempotency#key-required","title":"Idempotency key required","status":400,"detail":"Idempotency-Key header is required"}
}

// KeyScope puts each user's keys in a space of their own: two users who
// happen to send the same key get their own orders, never each other's
// response. In a real service the scope comes from authentication (a
// user ID the auth middleware put in the context), never from a header
// the client chooses freely.
func ExampleConfig_keyScope() {
	h := idempotency.New(idempotency.Config{
		KeyScope: func(r *http.Request) string { return r.Header.Get("X-User") },
	})(exampleOrders())

	examplePost(h, "order-1", "alice")
	examplePost(h, "order-1", "bob")   // same key, another user: runs
	examplePost(h, "order-1", "alice") // alice's retry: replayed
	// Output:
	// 201 {"id":1} replayed=false
	// 201 {"id":2} replayed=false
	// 201 {"id":1} replayed=true
}

// A Redis store shares records between every instance of a service. Here
// Redis is an in-process miniredis so that the example runs anywhere; in
// production the client points at Redis, Sentinel or Redis Cluster.
func ExampleNewRedisStore() {
	mr, err := miniredis.Run()
	if err != nil {
		log.Fatal(err)
	}
	defer mr.Close()

	rdb := redis.NewClient(&redis.Options{
		Addr:                  mr.Addr(),
		ContextTimeoutEnabled: true, // store calls honour the middleware's timeouts
	})
	defer rdb.Close()
	store := idempotency.NewRedisStore(rdb, idempotency.WithKeyPrefix("orders:idem:"))

	// Two instances of the service sharing the store.
	app := exampleOrders()
	instanceA := idempotency.New(idempotency.Config{Store: store})(app)
	instanceB := idempotency.New(idempotency.Config{Store: store})(app)

	examplePost(instanceA, "8e03978e-40d5-43e8-bc93-6894a57f9324", "")
	examplePost(instanceB, "8e03978e-40d5-43e8-bc93-6894a57f9324", "") // the retry lands elsewhere
	fmt.Println("redis keys:", len(mr.Keys()), strings.HasPrefix(mr.Keys()[0], "orders:idem:"))
	// Output:
	// 201 {"id":1} replayed=false
	// 201 {"id":1} replayed=true
	// redis keys: 1 true
}

// exampleCountingStore wraps another Store and counts the calls the
// middleware makes: the shape of any wrapper that adds metrics, tracing or
// logging to a store.
type exampleCountingStore struct {
	idempotency.Store // the wrapped store; methods not overridden go to it
	claims, completes atomic.Int64
}

func (s *exampleCountingStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	s.claims.Add(1)
	return s.Store.Claim(ctx, key, token, lease)
}

func (s *exampleCountingStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	s.completes.Add(1)
	return s.Store.Complete(ctx, key, token, rec, ttl)
}

// A custom Store: here a wrapper that counts the store operations of a
// memory store. A first execution costs one Claim and one Complete; a
// replay, one Claim. A store for another backend implements the six
// methods and runs the storetest conformance suite.
func ExampleStore() {
	mem := idempotency.NewMemoryStore()
	defer mem.Close()
	store := &exampleCountingStore{Store: mem}
	h := idempotency.New(idempotency.Config{Store: store})(exampleOrders())

	examplePost(h, "8e03978e-40d5-43e8-bc93-6894a57f9324", "")
	examplePost(h, "8e03978e-40d5-43e8-bc93-6894a57f9324", "")
	fmt.Println("claims:", store.claims.Load(), "completes:", store.completes.Load())
	// Output:
	// 201 {"id":1} replayed=false
	// 201 {"id":1} replayed=true
	// claims: 2 completes: 1
}

// SlogObserver logs one structured line per outcome. The client's key is
// never logged; storage_key is its hash, which an operator can pass to
// Store.Get or Store.Delete. (The time and duration are dropped here only
// to make the output repeatable.)
func ExampleSlogObserver() {
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey || a.Key == "duration" {
				return slog.Attr{}
			}
			return a
		},
	}))
	h := idempotency.New(idempotency.Config{
		Observer: idempotency.SlogObserver(logger),
	})(exampleOrders())

	r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{"item":"book"}`))
	r.Header.Set("Idempotency-Key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
	h.ServeHTTP(httptest.NewRecorder(), r)

	r = httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{"item":"book"}`))
	r.Header.Set("Idempotency-Key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
	h.ServeHTTP(httptest.NewRecorder(), r)

	r = httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{"item":"pen"}`))
	r.Header.Set("Idempotency-Key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
	h.ServeHTTP(httptest.NewRecorder(), r)
	// Output:
	// level=INFO msg=idempotency outcome=executed method=POST path=/orders status=201 storage_key=a33baa57d65a3b979e5d446ad71ea572159592cd60b1977eb6798e71cca8cb12
	// level=INFO msg=idempotency outcome=replayed method=POST path=/orders status=201 storage_key=a33baa57d65a3b979e5d446ad71ea572159592cd60b1977eb6798e71cca8cb12
	// level=INFO msg=idempotency outcome=mismatch method=POST path=/orders status=422 storage_key=a33baa57d65a3b979e5d446ad71ea572159592cd60b1977eb6798e71cca8cb12
}
