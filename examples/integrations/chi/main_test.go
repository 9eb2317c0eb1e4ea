package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// chiServer starts the API on a loopback port.
func chiServer(t *testing.T) *httptest.Server {
	t.Helper()
	store := idempotency.NewMemoryStore()
	t.Cleanup(func() { _ = store.Close() })
	srv := httptest.NewServer(newRouter(store))
	t.Cleanup(srv.Close)
	return srv
}

// chiResult is what a test looks at in a response.
type chiResult struct {
	status   int
	location string
	replayed string
	body     string
}

// chiSend sends method url with the key (none when empty).
func chiSend(t *testing.T, method, url, key string) chiResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(`{"amount":100}`))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return chiResult{resp.StatusCode, resp.Header.Get("Location"), resp.Header.Get(idempotency.ReplayedHeader), string(body)}
}

func TestChiReplay(t *testing.T) {
	srv := chiServer(t)
	for _, path := range []string{"/orders", "/payments"} {
		t.Run(path, func(t *testing.T) {
			first := chiSend(t, http.MethodPost, srv.URL+path, "key-"+path)
			retry := chiSend(t, http.MethodPost, srv.URL+path, "key-"+path)
			next := chiSend(t, http.MethodPost, srv.URL+path, "other-"+path)

			assert.Equal(t, http.StatusCreated, first.status)
			assert.Equal(t, path+"/1", first.location)
			assert.Empty(t, first.replayed)
			assert.Equal(t, first.status, retry.status)
			assert.Equal(t, first.location, retry.location, "the retry created nothing")
			assert.Equal(t, first.body, retry.body)
			assert.Equal(t, "true", retry.replayed)
			assert.Equal(t, path+"/2", next.location)
		})
	}
}

func TestChiKeyRequiredInGroup(t *testing.T) {
	srv := chiServer(t)

	payment := chiSend(t, http.MethodPost, srv.URL+"/payments", "")
	assert.Equal(t, http.StatusBadRequest, payment.status)
	assert.JSONEq(t, `{"type":"https://github.com/f8e778d0/idempotency#key-required","title":"Idempotency key required","status":400,"detail":"Idempotency-Key header is required"}`, payment.body)

	// Outside the group a key is optional: each keyless request runs.
	assert.Equal(t, "/orders/1", chiSend(t, http.MethodPost, srv.URL+"/orders", "").location)
	assert.Equal(t, "/orders/2", chiSend(t, http.MethodPost, srv.URL+"/orders", "").location)

	// The global middleware still checks keys in the group.
	invalid := chiSend(t, http.MethodPost, srv.URL+"/payments", "two words")
	assert.Equal(t, http.StatusBadRequest, invalid.status)
	assert.Contains(t, invalid.body, "key-invalid")

	health := chiSend(t, http.MethodGet, srv.URL+"/health", "")
	assert.Equal(t, http.StatusOK, health.status)
}
