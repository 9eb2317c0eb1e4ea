// Command metrics serves an orders API whose idempotency outcomes feed
// Prometheus counters through Config.Observer, exposed on /metrics.
//
//	go run ./metrics -addr localhost:8080
//	curl -s -X POST -H 'Idempotency-Key: k1' localhost:8080/orders
//	curl -s -X POST -H 'Idempotency-Key: k1' localhost:8080/orders
//	curl -s localhost:8080/metrics | grep idempotency_
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/f8e778d0/idempotency"
)

func main() {
	addr := flag.String("addr", "localhost:8080", "address to listen on")
	flag.Parse()

	store := idempotency.NewMemoryStore()
	defer store.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	log.Printf("listening on %s", *addr)
	log.Fatal(http.ListenAndServe(*addr, newServer(store, reg)))
}

// idempotencyMetrics counts the middleware's outcomes.
type idempotencyMetrics struct {
	requests *prometheus.CounterVec   // by outcome
	duration *prometheus.HistogramVec // handler time, by outcome
}

// outcomes lists every outcome, so that each counter exists (at zero)
// before it first happens and rate() queries see it.
var outcomes = []idempotency.Outcome{
	idempotency.OutcomeExecuted, idempotency.OutcomeReleased, idempotency.OutcomeReplayed,
	idempotency.OutcomeConflict, idempotency.OutcomeMismatch, idempotency.OutcomeKeyMissing,
	idempotency.OutcomeKeyInvalid, idempotency.OutcomeStoreError, idempotency.OutcomeStoreFull,
	idempotency.OutcomeLeaseLost, idempotency.OutcomeNotStored, idempotency.OutcomeNotStoredReplay,
}

// newIdempotencyMetrics registers the collectors with reg.
func newIdempotencyMetrics(reg prometheus.Registerer) *idempotencyMetrics {
	m := &idempotencyMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "idempotency_requests_total",
			Help: "Requests covered by the idempotency middleware, by outcome.",
		}, []string{"outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "idempotency_handler_duration_seconds",
			Help:    "How long the handler ran for requests that executed, by outcome.",
			Buckets: prometheus.DefBuckets,
		}, []string{"outcome"}),
	}
	for _, o := range outcomes {
		m.requests.WithLabelValues(o.String())
	}
	reg.MustRegister(m.requests, m.duration)
	return m
}

// observe is the middleware's Config.Observer. It is called on the request
// path, so it only increments: no I/O, no locks of its own.
func (m *idempotencyMetrics) observe(e idempotency.Event) {
	outcome := e.Outcome.String()
	m.requests.WithLabelValues(outcome).Inc()
	if e.Duration > 0 {
		m.duration.WithLabelValues(outcome).Observe(e.Duration.Seconds())
	}
}

// newServer returns the orders API behind the middleware, and /metrics
// serving reg.
func newServer(store idempotency.Store, reg *prometheus.Registry) http.Handler {
	m := newIdempotencyMetrics(reg)
	mw := idempotency.New(idempotency.Config{Store: store, Observer: m.observe})

	var orders atomic.Int64
	api := http.NewServeMux()
	api.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Location", fmt.Sprintf("/orders/%d", orders.Add(1)))
		w.WriteHeader(http.StatusCreated)
	})

	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.Handle("/", mw(api))
	return mux
}
