package idempotency

import (
	"context"
	"log/slog"
)

// SlogObserver returns a Config.Observer that writes one structured record
// per outcome to logger, with the message "idempotency" and these
// attributes, each present only when the event has it:
//
//	outcome      the Outcome's name ("executed", "replayed", ...)
//	method       the request method
//	path         the request URL path
//	status       the status sent to the client
//	storage_key  the hashed storage key (see [StorageKey]), never the
//	             client's key, which is not logged at all
//	err          the store error behind the outcome
//	detail       why a key was invalid or a response not stored
//	duration     how long the handler ran
//
// The level follows the outcome: [OutcomeLeaseLost] (a request may run
// twice) logs at Error; store errors, a full store and responses that were
// not stored log at Warn; a key missing where it is optional logs at
// Debug, since every keyless request on such a route has one, while a key
// missing where RequireKey asks for one (Event.Status 400) logs at Info, as
// every other outcome does. Records below the logger's level cost no
// allocation. The
// storage_key is what an operator passes to Store.Get or Store.Delete.
//
// SlogObserver panics if logger is nil.
func SlogObserver(logger *slog.Logger) func(Event) {
	if logger == nil {
		panic("idempotency: SlogObserver needs a non-nil logger")
	}
	return func(e Event) {
		level := slogLevel(e)
		ctx := context.Background()
		if e.Request != nil {
			ctx = e.Request.Context()
		}
		if !logger.Enabled(ctx, level) {
			return
		}
		attrs := make([]slog.Attr, 0, 8)
		attrs = append(attrs, slog.String("outcome", e.Outcome.String()))
		if r := e.Request; r != nil {
			attrs = append(attrs, slog.String("method", r.Method))
			if r.URL != nil {
				attrs = append(attrs, slog.String("path", r.URL.Path))
			}
		}
		if e.Status != 0 {
			attrs = append(attrs, slog.Int("status", e.Status))
		}
		if e.StorageKey != "" {
			attrs = append(attrs, slog.String("storage_key", e.StorageKey))
		}
		if e.Err != nil {
			attrs = append(attrs, slog.String("err", e.Err.Error()))
		}
		if e.Detail != "" {
			attrs = append(attrs, slog.String("detail", e.Detail))
		}
		if e.Duration != 0 {
			attrs = append(attrs, slog.Duration("duration", e.Duration))
		}
		logger.LogAttrs(ctx, level, "idempotency", attrs...)
	}
}

// slogLevel is the level SlogObserver logs an event at.
func slogLevel(e Event) slog.Level {
	switch e.Outcome {
	case OutcomeLeaseLost:
		return slog.LevelError
	case OutcomeStoreError, OutcomeStoreFull, OutcomeNotStored, OutcomeNotStoredReplay, OutcomeNotCommitted:
		return slog.LevelWarn
	case OutcomeKeyMissing:
		if e.Status == 0 {
			return slog.LevelDebug // passed through: the route does not require a key
		}
	}
	return slog.LevelInfo
}
