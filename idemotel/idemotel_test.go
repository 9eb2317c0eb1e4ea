package idemotel_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/idemotel"
)

// clientKey is the key the tests send; it must never reach a span or a
// metric.
const clientKey = "client-secret-key-71c2"

// telemetry is an SDK set up for a test: an in-memory span recorder and a
// manual metric reader.
type telemetry struct {
	spans  *tracetest.SpanRecorder
	tracer trace.Tracer
	reader *sdkmetric.ManualReader
	meter  *sdkmetric.MeterProvider
}

func newTelemetry(t *testing.T) *telemetry {
	t.Helper()
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() {
		_ = tp.Shutdown(context.Background())
		_ = mp.Shutdown(context.Background())
	})
	return &telemetry{spans: spans, tracer: tp.Tracer("test"), reader: reader, meter: mp}
}

// traced is the tracing middleware in front of the idempotency middleware:
// one span per request, in the request's context, ended when the request
// is served.
func (tel *telemetry) traced(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, span := tel.tracer.Start(r.Context(), r.Method+" "+r.URL.Path)
		defer span.End()
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// spanAttrs returns the attributes of the ended spans, in order.
func (tel *telemetry) spanAttrs() []map[attribute.Key]string {
	var out []map[attribute.Key]string
	for _, s := range tel.spans.Ended() {
		m := map[attribute.Key]string{}
		for _, kv := range s.Attributes() {
			m[kv.Key] = kv.Value.String()
		}
		out = append(out, m)
	}
	return out
}

// metrics collects what the reader holds: the counter by outcome and the
// histogram's count by outcome, and every attribute key seen on a point.
type metrics struct {
	requests  map[string]int64
	durations map[string]uint64
	sums      map[string]float64
	unit      map[string]string
	keys      map[attribute.Key]bool
	values    []string
}

func (tel *telemetry) collect(t *testing.T) metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, tel.reader.Collect(context.Background(), &rm))
	m := metrics{
		requests: map[string]int64{}, durations: map[string]uint64{}, sums: map[string]float64{},
		unit: map[string]string{}, keys: map[attribute.Key]bool{},
	}
	note := func(set attribute.Set) string {
		for _, kv := range set.ToSlice() {
			m.keys[kv.Key] = true
			m.values = append(m.values, kv.Value.String())
		}
		v, _ := set.Value("outcome")
		return v.AsString()
	}
	for _, sm := range rm.ScopeMetrics {
		assert.Equal(t, idemotel.ScopeName, sm.Scope.Name)
		for _, md := range sm.Metrics {
			m.unit[md.Name] = md.Unit
			switch data := md.Data.(type) {
			case metricdata.Sum[int64]:
				require.Equal(t, "idempotency.requests", md.Name)
				assert.True(t, data.IsMonotonic)
				for _, dp := range data.DataPoints {
					m.requests[note(dp.Attributes)] += dp.Value
				}
			case metricdata.Histogram[float64]:
				require.Equal(t, "idempotency.handler.duration", md.Name)
				for _, dp := range data.DataPoints {
					o := note(dp.Attributes)
					m.durations[o] += dp.Count
					m.sums[o] += dp.Sum
				}
			default:
				t.Fatalf("unexpected metric %s: %T", md.Name, md.Data)
			}
		}
	}
	return m
}

func send(t *testing.T, url, key, body string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, url, strings.NewReader(body))
	require.NoError(t, err)
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode
}

func TestObserverSpansAndMetrics(t *testing.T) {
	tel := newTelemetry(t)
	var chained []idempotency.Outcome
	var mu sync.Mutex
	mw := idempotency.New(idempotency.Config{
		Observer: idemotel.Observer(idemotel.WithMeterProvider(tel.meter), idemotel.WithNext(func(e idempotency.Event) {
			mu.Lock()
			chained = append(chained, e.Outcome)
			mu.Unlock()
		})),
	})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		time.Sleep(2 * time.Millisecond)
		w.WriteHeader(http.StatusCreated)
	})
	srv := httptest.NewServer(tel.traced(mw(h)))
	t.Cleanup(srv.Close)

	assert.Equal(t, http.StatusCreated, send(t, srv.URL, clientKey, "a"))
	assert.Equal(t, http.StatusCreated, send(t, srv.URL, clientKey, "a"))
	assert.Equal(t, http.StatusUnprocessableEntity, send(t, srv.URL, clientKey, "b"))
	assert.Equal(t, http.StatusCreated, send(t, srv.URL, "", "a"))
	assert.Equal(t, http.StatusBadRequest, send(t, srv.URL, "bad key", "a"))

	skey := idempotency.StorageKey("", clientKey)
	want := []map[attribute.Key]string{
		{"idempotency.outcome": "executed", "idempotency.storage_key": skey},
		{"idempotency.outcome": "replayed", "idempotency.storage_key": skey},
		{"idempotency.outcome": "mismatch", "idempotency.storage_key": skey},
		{"idempotency.outcome": "key_missing"},
		{"idempotency.outcome": "key_invalid"},
	}
	assert.Equal(t, want, tel.spanAttrs())
	for _, attrs := range tel.spanAttrs() {
		for k, v := range attrs {
			assert.NotContains(t, v, clientKey, "the client key on the span as %s", k)
		}
	}

	m := tel.collect(t)
	assert.Equal(t, map[string]int64{"executed": 1, "replayed": 1, "mismatch": 1, "key_missing": 1, "key_invalid": 1}, m.requests)
	assert.Equal(t, map[string]uint64{"executed": 1}, m.durations, "only outcomes that ran the handler")
	assert.GreaterOrEqual(t, m.sums["executed"], 0.002, "in seconds")
	assert.Less(t, m.sums["executed"], 5.0, "in seconds")
	assert.Equal(t, map[attribute.Key]bool{"outcome": true}, m.keys, "outcome is the only metric attribute")
	for _, v := range m.values {
		assert.NotEqual(t, skey, v)
		assert.NotContains(t, v, clientKey)
	}
	assert.Equal(t, "s", m.unit["idempotency.handler.duration"])

	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []idempotency.Outcome{
		idempotency.OutcomeExecuted, idempotency.OutcomeReplayed, idempotency.OutcomeMismatch,
		idempotency.OutcomeKeyMissing, idempotency.OutcomeKeyInvalid,
	}, chained, "WithNext sees every event")
}

// A 409 and the released claim of a 5xx are recorded too.
func TestObserverConflictAndRelease(t *testing.T) {
	tel := newTelemetry(t)
	mw := idempotency.New(idempotency.Config{Observer: idemotel.Observer(idemotel.WithMeterProvider(tel.meter))})
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/fail" {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		once.Do(func() { close(entered) })
		<-release
		w.WriteHeader(http.StatusCreated)
	})
	srv := httptest.NewServer(tel.traced(mw(h)))
	t.Cleanup(srv.Close)

	done := make(chan int, 1)
	go func() {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, srv.URL, nil)
		req.Header.Set("Idempotency-Key", "k")
		resp, err := http.DefaultClient.Do(req)
		if assert.NoError(t, err) {
			_ = resp.Body.Close()
			done <- resp.StatusCode
		} else {
			done <- 0
		}
	}()
	<-entered
	assert.Equal(t, http.StatusConflict, send(t, srv.URL, "k", ""))
	close(release)
	assert.Equal(t, http.StatusCreated, <-done)
	assert.Equal(t, http.StatusServiceUnavailable, send(t, srv.URL+"/fail", "k2", ""))

	m := tel.collect(t)
	assert.Equal(t, map[string]int64{"conflict": 1, "executed": 1, "released": 1}, m.requests)
	assert.Equal(t, map[string]uint64{"executed": 1, "released": 1}, m.durations)
}

// flakyStore fails the first completion; the retry, in the background,
// waits for the test to let it go on.
type flakyStore struct {
	*idempotency.MemoryStore
	calls atomic.Int32
	retry chan struct{}
}

func (s *flakyStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	if s.calls.Add(1) == 1 {
		return errors.New("connection reset")
	}
	<-s.retry
	return s.MemoryStore.Complete(ctx, key, token, rec, ttl)
}

// A completion retried in the background reports after the request's span
// ended: it is counted, and the span keeps what it had when it ended.
func TestObserverEventAfterSpanEnded(t *testing.T) {
	tel := newTelemetry(t)
	store := &flakyStore{MemoryStore: idempotency.NewMemoryStore(), retry: make(chan struct{})}
	executed := make(chan struct{})
	mw := idempotency.New(idempotency.Config{
		Store:   store,
		LockTTL: 10 * time.Second,
		Observer: idemotel.Observer(idemotel.WithMeterProvider(tel.meter), idemotel.WithNext(func(e idempotency.Event) {
			if e.Outcome == idempotency.OutcomeExecuted {
				close(executed)
			}
		})),
	})
	srv := httptest.NewServer(tel.traced(mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}))))
	t.Cleanup(srv.Close)

	assert.Equal(t, http.StatusCreated, send(t, srv.URL, clientKey, ""))
	require.Eventually(t, func() bool { return len(tel.spans.Ended()) == 1 }, 5*time.Second, time.Millisecond)
	close(store.retry) // the span has ended; the background retry may go on
	select {
	case <-executed:
	case <-time.After(10 * time.Second):
		t.Fatal("the background completion never reported")
	}

	assert.Equal(t, []map[attribute.Key]string{
		{"idempotency.outcome": "store_error", "idempotency.storage_key": idempotency.StorageKey("", clientKey)},
	}, tel.spanAttrs(), "the late event did not reach the ended span")
	m := tel.collect(t)
	assert.Equal(t, map[string]int64{"store_error": 1, "executed": 1}, m.requests, "but it was counted")
	assert.Equal(t, map[string]uint64{"executed": 1}, m.durations)
}

// Without a recording span, or without a request, the observer only
// counts.
func TestObserverWithoutSpan(t *testing.T) {
	tel := newTelemetry(t)
	observe := idemotel.Observer(idemotel.WithMeterProvider(tel.meter))
	observe(idempotency.Event{Outcome: idempotency.OutcomeLeaseLost})
	observe(idempotency.Event{Outcome: idempotency.OutcomeReplayed, Request: httptest.NewRequest(http.MethodPost, "/", nil)})
	observe(idempotency.Event{Outcome: idempotency.Outcome(200)})
	assert.Equal(t, map[string]int64{"lease_lost": 1, "replayed": 1, "unknown": 1}, tel.collect(t).requests)
	assert.Empty(t, tel.spans.Ended())
}
