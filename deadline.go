package idempotency

import (
	"context"
	"sync"
	"time"
)

// sharedDeadline bounds the store calls of the one-transaction mode
// (Begin, Commit and Rollback) by StoreTimeout without a runtime timer for
// each call: the calls that start within the same sixteenth of the timeout
// share one context that ends at its deadline, and each call gets at least
// 15/16 of the timeout and never more. A timer per call costs more than
// its own work: setting one while the Go scheduler is idle wakes a second
// thread, which on a small machine competes with the database for the
// cores (docs/postgres.md has the measurement).
type sharedDeadline struct {
	timeout time.Duration

	mu  sync.Mutex
	ctx context.Context // nil until the first call
	end time.Time       // ctx's deadline
	// cancel is ctx's, never called: ctx ends at its deadline, and until
	// then calls that started before it was replaced may still use it.
	cancel context.CancelFunc
}

// context returns a context for one call: it carries values's values and
// ends when the shared deadline passes or when the returned cancel
// function is called, which the caller must do once the call returned.
func (d *sharedDeadline) context(values context.Context) (context.Context, context.CancelFunc) {
	now := time.Now()
	d.mu.Lock()
	if d.ctx == nil || d.end.Sub(now) < d.timeout-d.timeout/16 {
		// The old context ends by itself, at its deadline, for the calls
		// that still use it.
		d.end = now.Add(d.timeout)
		d.ctx, d.cancel = context.WithDeadline(context.Background(), d.end)
	}
	shared := d.ctx
	d.mu.Unlock()
	ctx, cancel := context.WithCancel(shared)
	return boundContext{Context: ctx, values: values}, cancel
}

// boundContext has the deadline and the cancellation of its Context and
// the values of values. Its Context's own values (the context package's,
// which find the cancellation) come first; the shared context that
// sharedDeadline hands out has no others.
type boundContext struct {
	context.Context
	values context.Context
}

func (c boundContext) Value(key any) any {
	if v := c.Context.Value(key); v != nil {
		return v
	}
	return c.values.Value(key)
}
