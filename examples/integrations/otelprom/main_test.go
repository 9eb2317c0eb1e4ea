package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

func otelpromDo(t *testing.T, method, url, key string) (*http.Response, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	require.NoError(t, err)
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(body)
}

// The idemotel metrics reach a Prometheus scrape under the names a
// Prometheus user expects, with outcome as their only label of ours.
func TestOtelPrometheusScrape(t *testing.T) {
	h, shutdown, err := newServer(prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { _ = shutdown(context.Background()) })
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)

	first, _ := otelpromDo(t, http.MethodPost, srv.URL+"/orders", "k1")
	retry, _ := otelpromDo(t, http.MethodPost, srv.URL+"/orders", "k1")
	assert.Equal(t, http.StatusCreated, first.StatusCode)
	assert.Equal(t, "true", retry.Header.Get(idempotency.ReplayedHeader))

	resp, body := otelpromDo(t, http.MethodGet, srv.URL+"/metrics", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	sample := func(name, outcome string) *regexp.Regexp {
		return regexp.MustCompile(`(?m)^` + name + `\{[^}]*outcome="` + outcome + `"[^}]*\} 1$`)
	}
	assert.Regexp(t, sample("idempotency_requests_total", "executed"), body)
	assert.Regexp(t, sample("idempotency_requests_total", "replayed"), body)
	assert.Regexp(t, sample("idempotency_handler_duration_seconds_count", "executed"), body)
	assert.NotContains(t, body, idempotency.StorageKey("", "k1"), "the storage key is never a label")
}
