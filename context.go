package idempotency

import (
	"context"
	"sync"
	"sync/atomic"
)

// leaseContext is the context of a handler that holds a claim: the
// request's context, carrying the client key, that is also cancelled, with
// cause ErrLeaseLost, when the claim is lost, and cancelled when the handler
// returns, like the context of a WithCancelCause child.
//
// The cancellable child is made only when something needs it: the first
// Done or Err (a select, a database call, a derived context), or the loss of
// the lease. Until then Value and Deadline read the request's context
// directly, so a handler that never waits on its context costs no
// allocation for it. Once made, every method reads the child, so
// context.Cause, context.AfterFunc and derived contexts see an ordinary
// cancelCtx and need no goroutine.
type leaseContext struct {
	context.Context // the request's context
	key             string

	// view is the handler's response writer and request body.
	view handlerView

	made atomic.Bool // child and cancelChild are set
	mu   sync.Mutex  // guards making the child, and ended
	// child is a context.WithCancelCause child of the request's context.
	child       context.Context
	cancelChild context.CancelCauseFunc
	ended       bool // the handler returned
}

// cancellable returns the child, making it on first use.
func (c *leaseContext) cancellable() context.Context {
	if c.made.Load() {
		return c.child
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.made.Load() {
		c.child, c.cancelChild = context.WithCancelCause(c.Context)
		if c.ended {
			c.cancelChild(nil)
		}
		c.made.Store(true)
	}
	return c.child
}

// Done returns the child's Done channel.
func (c *leaseContext) Done() <-chan struct{} { return c.cancellable().Done() }

// Err returns the child's Err.
func (c *leaseContext) Err() error { return c.cancellable().Err() }

// Value returns the client key for KeyFromContext and delegates every other
// key: to the child once it exists (so context.Cause finds its cause), to
// the request's context before.
func (c *leaseContext) Value(k any) any {
	if _, ok := k.(keyContextKey); ok {
		return c.key
	}
	if c.made.Load() {
		return c.child.Value(k)
	}
	return c.Context.Value(k)
}

// cancel cancels the context with cause.
func (c *leaseContext) cancel(cause error) {
	c.cancellable()
	c.cancelChild(cause)
}

// end cancels the context once the handler has returned, as net/http
// cancels a request's context when ServeHTTP returns. A child made later is
// born cancelled.
func (c *leaseContext) end() {
	c.mu.Lock()
	c.ended = true
	cancel := c.cancelChild
	c.mu.Unlock()
	if cancel != nil {
		cancel(nil)
	}
}
