// Command otelprom serves an orders API whose idempotency outcomes go to
// OpenTelemetry through idemotel, and from there to Prometheus through
// OpenTelemetry's Prometheus exporter, exposed on /metrics.
//
//	go run ./otelprom -addr localhost:8080
//	curl -s -X POST -H 'Idempotency-Key: k1' localhost:8080/orders
//	curl -s -X POST -H 'Idempotency-Key: k1' localhost:8080/orders
//	curl -s localhost:8080/metrics | grep idempotency_
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprometheus "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/idemotel"
)

func main() {
	addr := flag.String("addr", "localhost:8080", "address to listen on")
	flag.Parse()

	reg := prometheus.NewRegistry()
	h, shutdown, err := newServer(reg)
	if err != nil {
		log.Fatal(err)
	}
	defer shutdown(context.Background())
	log.Printf("listening on %s", *addr)
	log.Fatal(http.ListenAndServe(*addr, h))
}

// newServer returns the orders API behind the middleware, and /metrics
// serving reg, which the OpenTelemetry exporter feeds. shutdown stops the
// meter provider.
func newServer(reg *prometheus.Registry) (http.Handler, func(context.Context) error, error) {
	exporter, err := otelprometheus.New(otelprometheus.WithRegisterer(reg))
	if err != nil {
		return nil, nil, err
	}
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	// Most programs set the global provider (otel.SetMeterProvider) and
	// call idemotel.Observer() without options.
	mw := idempotency.New(idempotency.Config{
		Observer: idemotel.Observer(idemotel.WithMeterProvider(provider)),
	})

	var orders atomic.Int64
	api := http.NewServeMux()
	api.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Location", fmt.Sprintf("/orders/%d", orders.Add(1)))
		w.WriteHeader(http.StatusCreated)
	})

	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.Handle("/", mw(api))
	return mux, provider.Shutdown, nil
}
