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

// gorillaServer starts the service on a loopback port.
func gorillaServer(t *testing.T) *httptest.Server {
	t.Helper()
	store := idempotency.NewMemoryStore()
	t.Cleanup(func() { _ = store.Close() })
	srv := httptest.NewServer(newRouter(store))
	t.Cleanup(srv.Close)
	return srv
}

// gorillaResult is what a test looks at in a response.
type gorillaResult struct {
	status   int
	location string
	replayed string
	body     string
}

// gorillaPost posts to url with the key (none when empty).
func gorillaPost(t *testing.T, url, key string) gorillaResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(`{"item":"book"}`))
	require.NoError(t, err)
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return gorillaResult{resp.StatusCode, resp.Header.Get("Location"), resp.Header.Get(idempotency.ReplayedHeader), string(body)}
}

func TestGorillaReplay(t *testing.T) {
	srv := gorillaServer(t)

	first := gorillaPost(t, srv.URL+"/api/orders", "8e03978e-40d5-43e8-bc93-6894a57f9324")
	retry := gorillaPost(t, srv.URL+"/api/orders", "8e03978e-40d5-43e8-bc93-6894a57f9324")
	other := gorillaPost(t, srv.URL+"/api/orders", "1f0c2b5e-7a8d-4c3e-9b2a-0d4e5f6a7b8c")

	assert.Equal(t, http.StatusCreated, first.status)
	assert.Equal(t, "/api/orders/1", first.location)
	assert.Empty(t, first.replayed)
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.Equal(t, first.location, retry.location, "the retry created nothing")
	assert.Equal(t, first.body, retry.body)
	assert.Equal(t, "true", retry.replayed)
	assert.Equal(t, "/api/orders/2", other.location)
}

func TestGorillaSubrouterOnly(t *testing.T) {
	srv := gorillaServer(t)

	missing := gorillaPost(t, srv.URL+"/api/orders", "")
	assert.Equal(t, http.StatusBadRequest, missing.status, "the subrouter requires a key")
	assert.Contains(t, missing.body, "key-required")

	// Outside the subrouter the middleware is not installed: the same key
	// twice runs twice.
	assert.Equal(t, "webhook 1\n", gorillaPost(t, srv.URL+"/webhooks", "k").body)
	assert.Equal(t, "webhook 2\n", gorillaPost(t, srv.URL+"/webhooks", "k").body)

	// A path the subrouter does not match never reaches the middleware:
	// no 400 for the missing key, a plain 404.
	unmatched := gorillaPost(t, srv.URL+"/api/nowhere", "")
	assert.Equal(t, http.StatusNotFound, unmatched.status)
}
