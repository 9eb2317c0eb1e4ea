package idemotel_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/idemotel"
)

// The observer records metrics with the application's meter provider (the
// global one by default) and, chained with WithNext, also feeds the slog
// observer. A Prometheus exporter as the provider's reader serves the same
// metrics to a scrape.
func ExampleObserver() {
	reader := sdkmetric.NewManualReader() // or the Prometheus exporter
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer provider.Shutdown(context.Background())

	logger := slog.New(slog.DiscardHandler) // the application's logger
	mw := idempotency.New(idempotency.Config{
		Observer: idemotel.Observer(
			idemotel.WithMeterProvider(provider),
			idemotel.WithNext(idempotency.SlogObserver(logger)),
		),
	})
	h := mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
	}))
	for range 3 {
		r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{}`))
		r.Header.Set("Idempotency-Key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
		h.ServeHTTP(httptest.NewRecorder(), r)
	}

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		log.Fatal(err)
	}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		if sum, ok := m.Data.(metricdata.Sum[int64]); ok {
			counts := map[string]int64{}
			for _, dp := range sum.DataPoints {
				outcome, _ := dp.Attributes.Value("outcome")
				counts[outcome.AsString()] = dp.Value
			}
			fmt.Println(m.Name, counts)
		}
	}
	// Output:
	// idempotency.requests map[executed:1 replayed:2]
}
