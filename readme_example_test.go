package idempotency_test

// The examples in this file mirror the Go snippets of README.md and docs/, so that
// every snippet there is known to compile and, where the output is
// deterministic, to do what the README says.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/client"
	"github.com/f8e778d0/idempotency/storetest"
)

// readmeUserKey is the context key under which readmeAuthenticate puts the
// authenticated user.
type readmeUserKey struct{}

// readmeAuthenticate stands in for a service's authentication: it maps a
// bearer token to a user and refuses requests it cannot map.
func readmeAuthenticate(next http.Handler) http.Handler {
	users := map[string]string{"Bearer token-alice": "alice", "Bearer token-bob": "bob"}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, ok := users[r.Header.Get("Authorization")]
		if !ok {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), readmeUserKey{}, user)))
	})
}

// readmeUserID returns the user readmeAuthenticate found.
func readmeUserID(r *http.Request) string {
	user, _ := r.Context().Value(readmeUserKey{}).(string)
	return user
}

// readmeCreateOrder creates an order with the next number and answers 201.
func readmeCreateOrder() http.HandlerFunc {
	var next atomic.Int64
	return func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		id := next.Add(1)
		w.Header().Set("Location", fmt.Sprintf("/orders/%d", id))
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":%d}`, id)
	}
}

// readmeSend sends a POST /orders through h as the user of token, with key
// and body, and prints the answer.
func readmeSend(h http.Handler, token, key, body string) {
	r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(body))
	r.Header.Set("Authorization", "Bearer "+token)
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Idempotency-Key", key)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	fmt.Printf("%d %s replayed=%t\n", w.Code, w.Body.String(), w.Header().Get(idempotency.ReplayedHeader) == "true")
}

// The README's quick start: the middleware after authentication, keys
// scoped to the authenticated user.
func Example_readmeQuickStart() {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", readmeCreateOrder())

	mw := idempotency.New(idempotency.Config{
		// The principal a key belongs to: keys of different users never meet.
		KeyScope: func(r *http.Request) string { return readmeUserID(r) },
	})
	handler := readmeAuthenticate(mw(mux)) // authenticate first, so KeyScope sees the user
	// log.Fatal(http.ListenAndServe(":8080", handler))

	readmeSend(handler, "token-alice", "8e03978e-40d5-43e8-bc93-6894a57f9324", `{"item":"book"}`)
	readmeSend(handler, "token-alice", "8e03978e-40d5-43e8-bc93-6894a57f9324", `{"item":"book"}`) // the retry
	readmeSend(handler, "token-bob", "8e03978e-40d5-43e8-bc93-6894a57f9324", `{"item":"book"}`)   // same key, other user
	readmeSend(handler, "token-alice", "8e03978e-40d5-43e8-bc93-6894a57f9324", `{"item":"pen"}`)  // same key, other body
	// Output:
	// 201 {"id":1} replayed=false
	// 201 {"id":1} replayed=true
	// 201 {"id":2} replayed=false
	// 422 {"type":"https://github.com/f8e778d0/idempotency#key-reused","title":"Idempotency key reused","status":422,"detail":"This Idempotency-Key was already used for a different request"} replayed=false
}

// readmeProvider stands in for a payment provider that takes an
// idempotency key of its own.
type readmeProvider struct{}

func (readmeProvider) Charge(_ context.Context, amount int, key string) (string, error) {
	return fmt.Sprintf("charged %d with key %s", amount, key), nil
}

// The README's handler: it stops when its lease is lost and passes the
// client's key on to the payment provider.
func Example_readmeHandler() {
	provider := readmeProvider{}
	pay := func(w http.ResponseWriter, r *http.Request) {
		if errors.Is(context.Cause(r.Context()), idempotency.ErrLeaseLost) {
			return // another request may own the key now: do not charge
		}
		key, _ := idempotency.KeyFromContext(r.Context())
		receipt, err := provider.Charge(r.Context(), 100, "pay-"+key) // the provider's own key
		if err != nil {
			http.Error(w, "payment failed", http.StatusBadGateway)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprint(w, receipt)
	}

	h := idempotency.New(idempotency.Config{})(http.HandlerFunc(pay))
	r := httptest.NewRequest(http.MethodPost, "/payments", strings.NewReader(`{"amount":100}`))
	r.Header.Set("Idempotency-Key", "k-42")
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	fmt.Println(w.Code, w.Body.String())
	// Output:
	// 201 charged 100 with key pay-k-42
}

// The README's Redis store. Redis is an in-process miniredis here; in
// production the addresses point at Redis or at Redis Cluster seeds.
func Example_readmeRedis() {
	mr, err := miniredis.Run()
	if err != nil {
		log.Fatal(err)
	}
	defer mr.Close()

	rdb := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:                 []string{mr.Addr()}, // several seed addresses: Redis Cluster
		ContextTimeoutEnabled: true,                // so StoreTimeout bounds every call
	})
	defer rdb.Close()
	store := idempotency.NewRedisStore(rdb, idempotency.WithKeyPrefix("orders:idem:"))
	mw := idempotency.New(idempotency.Config{Store: store})

	h := mw(readmeCreateOrder())
	readmeSend(h, "", "k1", `{"item":"book"}`)
	readmeSend(h, "", "k1", `{"item":"book"}`)
	fmt.Println(len(mr.Keys()), strings.HasPrefix(mr.Keys()[0], "orders:idem:"))
	// Output:
	// 201 {"id":1} replayed=false
	// 201 {"id":1} replayed=true
	// 1 true
}

// The README's memory store with a smaller entry cap.
func Example_readmeMemoryStore() {
	store := idempotency.NewMemoryStore(idempotency.WithMaxEntries(100_000))
	defer store.Close()
	mw := idempotency.New(idempotency.Config{Store: store})

	h := mw(readmeCreateOrder())
	readmeSend(h, "", "k1", `{"item":"book"}`)
	fmt.Println("records:", store.Len())
	// Output:
	// 201 {"id":1} replayed=false
	// records: 1
}

// The README's conformance test for a custom store, here with the memory
// store in its place. It is compiled, not run: the suite lets real time
// pass and belongs to the store's own tests.
func Example_readmeConformance() {
	newMyStore := func() idempotency.Store { return idempotency.NewMemoryStore() }

	testMyStore := func(t *testing.T) {
		store := newMyStore()
		storetest.Run(t, func(*testing.T) idempotency.Store { return store })
	}
	_ = testMyStore
}

// The nesting of docs/frameworks.md: a router-wide instance with optional
// keys and a route with an instance of its own that requires them. It is
// compiled, not run here.
func Example_readmeNested() {
	store := idempotency.NewMemoryStore()
	mux := http.NewServeMux()
	createPayment := readmeCreateOrder()

	strict := idempotency.New(idempotency.Config{Store: store, RequireKey: true})
	mux.Handle("POST /payments", strict(http.HandlerFunc(createPayment)))
	handler := idempotency.New(idempotency.Config{Store: store})(mux)
	_ = handler
}

// The logging of docs/observability.md: one slog record per outcome. (The time and
// duration are dropped only to make the output repeatable.)
func Example_readmeSlog() {
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey || a.Key == "duration" {
				return slog.Attr{}
			}
			return a
		},
	}))
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(logger)

	mw := idempotency.New(idempotency.Config{Observer: idempotency.SlogObserver(slog.Default())})

	h := mw(readmeCreateOrder())
	r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{}`))
	r.Header.Set("Idempotency-Key", "order-42")
	h.ServeHTTP(httptest.NewRecorder(), r)
	// Output:
	// level=INFO msg=idempotency outcome=executed method=POST path=/orders status=201 storage_key=caf5bcf6f2098eb9391de92e56513057ca42ae3e6f2174f99182351ecefc18ac
}

// The README's client: an http.Client whose POSTs carry a key and are
// retried with it, bounded by the caller's context. The handler runs once.
func Example_readmeClient() {
	var executions atomic.Int32
	orders := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		executions.Add(1)
		w.WriteHeader(http.StatusCreated)
	})
	srv := httptest.NewServer(idempotency.New(idempotency.Config{RequireKey: true})(orders))
	defer srv.Close()
	url, body := srv.URL+"/orders", `{"item":"book"}`

	ctx := context.Background()

	c := &http.Client{Transport: &client.Transport{}} // 4 attempts, 250ms to 10s backoff
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	resp, err := c.Do(req)
	if err != nil {
		var e *client.Error
		if errors.As(err, &e) {
			log.Fatalf("no answer; send it again later with key %s", e.Key)
		}
		log.Fatal(err)
	}
	resp.Body.Close()
	fmt.Println(resp.StatusCode, "executions:", executions.Load())
	// Output:
	// 201 executions: 1
}
