package idempotency_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/f8e778d0/idempotency"
)

// An operator looks up and clears the record of a stuck or poisoned key
// without knowing how the store encodes it: StorageKey turns the client's
// key (and its scope, if Config.KeyScope is set) into the store key.
func ExampleStorageKey() {
	store := idempotency.NewMemoryStore()
	mw := idempotency.New(idempotency.Config{Store: store})
	h := mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}))
	req := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{}`))
	req.Header.Set("Idempotency-Key", "order-42")
	h.ServeHTTP(httptest.NewRecorder(), req)

	ctx := context.Background()
	key := idempotency.StorageKey("", "order-42")
	rec, err := store.Get(ctx, key)
	if err != nil {
		panic(err)
	}
	fmt.Println(rec.State, rec.Response.StatusCode)

	if err := store.Delete(ctx, key); err != nil {
		panic(err)
	}
	rec, _ = store.Get(ctx, key)
	fmt.Println(rec == nil)
	// Output:
	// completed 201
	// true
}
