package idempotency_test

// What a store of the user's receives from the middleware: a Record of its
// own, which it may keep, that costs the response's body once.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// customKeepingStore is the simplest custom store there is: it embeds a
// MemoryStore for the protocol and keeps what Complete hands it, as a
// store that holds records (an LRU, a test double, a write-behind cache)
// does. keep decides which parts of the record it retains.
type customKeepingStore struct {
	*idempotency.MemoryStore
	keep func(rec *idempotency.Record) any
	mu   sync.Mutex
	kept []any
}

func (s *customKeepingStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	s.mu.Lock()
	s.kept = append(s.kept, s.keep(rec))
	s.mu.Unlock()
	return s.MemoryStore.Complete(ctx, key, token, rec, ttl)
}

// customRetained runs n first executions whose handler writes bodySize
// bytes, through a custom store that keeps keep(rec) of each, and returns
// how many heap bytes stay live afterwards.
func customRetained(t *testing.T, n, bodySize int, keep func(*idempotency.Record) any) int64 {
	t.Helper()
	body := strings.Repeat("b", bodySize)
	store := &customKeepingStore{MemoryStore: idempotency.NewMemoryStore(), keep: keep}
	h := idempotency.New(idempotency.Config{Store: store})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, body)
	}))
	// Warm the flight pool so that its buffers are not counted.
	for i := range 2 {
		req := httptest.NewRequest(http.MethodPost, "/pay", strings.NewReader("{}"))
		req.Header.Set("Idempotency-Key", fmt.Sprint("warm-", i))
		h.ServeHTTP(httptest.NewRecorder(), req)
	}
	store.mu.Lock()
	store.kept = store.kept[:0]
	store.mu.Unlock()

	var before, after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		req := httptest.NewRequest(http.MethodPost, "/pay", strings.NewReader("{}"))
		req.Header.Set("Idempotency-Key", fmt.Sprint("key-", i))
		rr := httptest.NewRecorder()
		h.ServeHTTP(rr, req)
		require.Equal(t, http.StatusCreated, rr.Code)
	}
	// The MemoryStore under the wrapper also keeps an encoding of each
	// record; drop it so only what the custom store kept is measured.
	for i := range n {
		require.NoError(t, store.MemoryStore.Delete(context.Background(), idempotency.StorageKey("", fmt.Sprint("key-", i))))
	}
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(store)
	runtime.KeepAlive(h)
	return int64(after.HeapAlloc) - int64(before.HeapAlloc)
}

// A custom store that keeps the Record it was given holds the body once: the
// record's strings must not share memory with a second copy of the body,
// since every store keeps rec.Token.
func TestCustomStoreRecordHoldsBodyOnce(t *testing.T) {
	const n, size = 16, 256 << 10
	got := customRetained(t, n, size, func(rec *idempotency.Record) any { return rec })
	t.Logf("retained %d bytes for %d bodies of %d bytes (%.2fx)", got, n, size, float64(got)/float64(n*size))
	assert.Less(t, got, int64(n*size)*3/2, "a kept Record costs its body once, not twice")
}

// A store that keeps only the metadata (token, status, headers) and puts
// the body elsewhere retains no body at all.
func TestCustomStoreTokenAndHeaderDoNotPinBody(t *testing.T) {
	const n, size = 16, 256 << 10
	type meta struct {
		token  string
		status int
		header http.Header
	}
	got := customRetained(t, n, size, func(rec *idempotency.Record) any {
		return meta{rec.Token, rec.Response.StatusCode, rec.Response.Header}
	})
	t.Logf("retained %d bytes for %d bodies of %d bytes (%.2fx)", got, n, size, float64(got)/float64(n*size))
	assert.Less(t, got, int64(n*size)/4, "the token and the headers do not keep the body alive")
}

// A "present and empty" Content-Type (the handler flushed before writing,
// or set the field to nil) reaches a custom store as a nil slice, as
// net/http itself spells it.
func TestCustomStorePresentEmptyContentTypeIsNil(t *testing.T) {
	var got *idempotency.Record
	store := &customKeepingStore{MemoryStore: idempotency.NewMemoryStore(), keep: func(rec *idempotency.Record) any {
		c := *rec // the memory store keeps the header in a form of its own
		c.Response.Header = rec.Response.Header.Clone()
		got = &c
		return nil
	}}
	h := idempotency.New(idempotency.Config{Store: store})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header()["Content-Type"] = nil
		_, _ = io.WriteString(w, "<html>x</html>")
	}))
	req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("{}"))
	req.Header.Set("Idempotency-Key", "k")
	h.ServeHTTP(httptest.NewRecorder(), req)
	require.NotNil(t, got)
	v, present := got.Response.Header["Content-Type"]
	assert.True(t, present)
	assert.Nil(t, v, "present and empty is a nil slice")
}
