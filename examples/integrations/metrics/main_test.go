package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// metricsServer starts the service on a loopback port with its own registry.
func metricsServer(t *testing.T) (*httptest.Server, *prometheus.Registry) {
	t.Helper()
	store := idempotency.NewMemoryStore()
	t.Cleanup(func() { _ = store.Close() })
	reg := prometheus.NewRegistry()
	srv := httptest.NewServer(newServer(store, reg))
	t.Cleanup(srv.Close)
	return srv, reg
}

// metricsDo sends a request and returns the response with its body read.
func metricsDo(t *testing.T, method, url, key string) (*http.Response, string) {
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

// metricsCount reads the outcome counter from the registry.
func metricsCount(t *testing.T, reg *prometheus.Registry, outcome string) float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() != "idempotency_requests_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no idempotency_requests_total{outcome=%q}", outcome)
	return 0
}

func TestMetricsReplayCounted(t *testing.T) {
	srv, reg := metricsServer(t)
	require.Zero(t, metricsCount(t, reg, "replayed"), "every outcome starts at zero")

	first, _ := metricsDo(t, http.MethodPost, srv.URL+"/orders", "k1")
	retry, _ := metricsDo(t, http.MethodPost, srv.URL+"/orders", "k1")
	assert.Equal(t, http.StatusCreated, first.StatusCode)
	assert.Equal(t, http.StatusCreated, retry.StatusCode)
	assert.Equal(t, first.Header.Get("Location"), retry.Header.Get("Location"))
	assert.Equal(t, "true", retry.Header.Get(idempotency.ReplayedHeader))

	assert.Equal(t, 1.0, metricsCount(t, reg, "executed"))
	assert.Equal(t, 1.0, metricsCount(t, reg, "replayed"))

	_, _ = metricsDo(t, http.MethodPost, srv.URL+"/orders", "k1")
	_, _ = metricsDo(t, http.MethodPost, srv.URL+"/orders", "")
	assert.Equal(t, 2.0, metricsCount(t, reg, "replayed"))
	assert.Equal(t, 1.0, metricsCount(t, reg, "key_missing"))
	assert.Equal(t, 1, testutil.CollectAndCount(reg, "idempotency_handler_duration_seconds"), "one histogram: executed")

	resp, body := metricsDo(t, http.MethodGet, srv.URL+"/metrics", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, body, `idempotency_requests_total{outcome="replayed"} 2`)
	assert.Contains(t, body, `idempotency_requests_total{outcome="executed"} 1`)
	assert.Contains(t, body, `idempotency_requests_total{outcome="conflict"} 0`)
	assert.Contains(t, body, `idempotency_handler_duration_seconds_count{outcome="executed"} 1`)
}
