// Package idemotel reports the idempotency middleware's outcomes to
// OpenTelemetry: as attributes of each request's span, and as metrics.
//
//	mw := idempotency.New(idempotency.Config{
//		Observer: idemotel.Observer(),
//	})
//	http.ListenAndServe(addr, otelhttp.NewHandler(mw(mux), "api"))
//
// # Traces
//
// The span is the one in the request's context
// (trace.SpanFromContext), so a tracing middleware such as otelhttp goes
// in front of the idempotency middleware. Each covered request's span
// gets these attributes:
//
//	idempotency.outcome      the outcome's name ("executed", "replayed", ...)
//	idempotency.storage_key  the hashed storage key (see idempotency.StorageKey),
//	                         when the request had a valid key
//
// The client's key is never recorded. An event that arrives after the span
// ended (a completion retried in the background reports after the
// response) is counted but not added to the span.
//
// # Metrics
//
//	idempotency.requests          counter of covered requests, by outcome
//	idempotency.handler.duration  histogram of how long the handler ran, in
//	                              seconds, by outcome (outcomes that ran it)
//
// Their only attribute is outcome; the storage key, one value per request,
// is never a metric attribute. With OpenTelemetry's Prometheus exporter
// (go.opentelemetry.io/otel/exporters/prometheus) they are scraped as
// idempotency_requests_total and idempotency_handler_duration_seconds.
//
// The package depends on the OpenTelemetry API only; the application
// chooses and configures the SDK.
package idemotel

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"

	"github.com/f8e778d0/idempotency"
)

// ScopeName is the instrumentation scope of the meter the metrics are
// recorded with.
const ScopeName = "github.com/f8e778d0/idempotency/idemotel"

const (
	attrOutcome    = "idempotency.outcome"
	attrStorageKey = "idempotency.storage_key"
	metricRequests = "idempotency.requests"
	metricDuration = "idempotency.handler.duration"
	metricOutcome  = "outcome"
)

// durationBuckets are the histogram's bucket boundaries in seconds, those
// OpenTelemetry recommends for HTTP server durations.
var durationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10}

// Option configures the observer Observer returns.
type Option func(*options)

type options struct {
	meterProvider metric.MeterProvider
	next          func(idempotency.Event)
}

// WithMeterProvider sets the provider of the meter the metrics are
// recorded with. Default: the global provider (otel.GetMeterProvider) at
// the time Observer is called.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(o *options) { o.meterProvider = mp }
}

// WithNext passes every event on to next after recording it, so that one
// Config.Observer can feed OpenTelemetry and, say, idempotency.SlogObserver.
// Default: none.
func WithNext(next func(idempotency.Event)) Option {
	return func(o *options) { o.next = next }
}

// Observer returns a Config.Observer that records each event on the
// request's span and in the metrics described in the package
// documentation. It creates its instruments once, here; errors creating
// them go to otel.Handle. The observer is safe for concurrent use.
func Observer(opts ...Option) func(idempotency.Event) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	mp := o.meterProvider
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	meter := mp.Meter(ScopeName)
	requests, err := meter.Int64Counter(metricRequests,
		metric.WithDescription("Requests the idempotency middleware covered, by outcome."),
		metric.WithUnit("{request}"))
	if err != nil {
		otel.Handle(err)
		if requests == nil {
			requests = noop.Int64Counter{}
		}
	}
	duration, err := meter.Float64Histogram(metricDuration,
		metric.WithDescription("How long the handler ran under the idempotency middleware."),
		metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(durationBuckets...))
	if err != nil {
		otel.Handle(err)
		if duration == nil {
			duration = noop.Float64Histogram{}
		}
	}

	// One attribute set per outcome, made once: the request path only
	// looks them up.
	known := map[idempotency.Outcome]metric.MeasurementOption{}
	for out := idempotency.Outcome(1); out.String() != "unknown"; out++ {
		known[out] = outcomeSet(out)
	}
	next := o.next

	return func(e idempotency.Event) {
		ctx := context.Background()
		if e.Request != nil {
			ctx = e.Request.Context()
			if span := trace.SpanFromContext(ctx); span.IsRecording() {
				span.SetAttributes(attribute.String(attrOutcome, e.Outcome.String()))
				if e.StorageKey != "" {
					span.SetAttributes(attribute.String(attrStorageKey, e.StorageKey))
				}
			}
		}
		set, ok := known[e.Outcome]
		if !ok {
			set = outcomeSet(e.Outcome)
		}
		requests.Add(ctx, 1, set)
		if e.Duration > 0 {
			duration.Record(ctx, e.Duration.Seconds(), set)
		}
		if next != nil {
			next(e)
		}
	}
}

func outcomeSet(out idempotency.Outcome) metric.MeasurementOption {
	return metric.WithAttributeSet(attribute.NewSet(attribute.String(metricOutcome, out.String())))
}
