package idempotency_test

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/f8e778d0/idempotency"
)

// A memory store used directly, the way the middleware uses it: claim a
// key, complete it with the response, and find the response on a retry.
func ExampleNewMemoryStore() {
	store := idempotency.NewMemoryStore(idempotency.WithMaxEntries(100_000))
	defer store.Close()

	ctx := context.Background()
	key := "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"

	rec, err := store.Claim(ctx, key, "token-1", 30*time.Second)
	fmt.Println("first claim:", rec, err)

	rec, _ = store.Claim(ctx, key, "token-2", 30*time.Second)
	fmt.Println("concurrent claim:", rec.State)

	err = store.Complete(ctx, key, "token-1", &idempotency.Record{
		Response: idempotency.Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Location": {"/orders/1"}},
			Body:       []byte(`{"id":1}`),
		},
	}, 24*time.Hour)
	fmt.Println("complete:", err)

	rec, _ = store.Claim(ctx, key, "token-3", 30*time.Second)
	fmt.Println("retry:", rec.State, rec.Response.StatusCode, string(rec.Response.Body))
	fmt.Println("records:", store.Len())
	// Output:
	// first claim: <nil> <nil>
	// concurrent claim: in-flight
	// complete: <nil>
	// retry: completed 201 {"id":1}
	// records: 1
}
