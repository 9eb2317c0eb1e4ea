package idempotency

import "context"

// KeyFromContext returns the client's idempotency key of the request whose
// context ctx is, as the handler sees it, and whether there is one.
func KeyFromContext(ctx context.Context) (string, bool) {
	if c, ok := ctx.Value(keyContextKey{}).(*keyContext); ok {
		return c.key, true
	}
	return "", false
}

// claimedByOuter reports whether ctx is the context of a request that an
// instance of this middleware already claimed, so that an inner instance
// lets it pass.
func claimedByOuter(ctx context.Context) bool {
	c, ok := ctx.Value(keyContextKey{}).(*keyContext)
	return ok && c.claimed
}

type keyContextKey struct{}

// keyContext is the context a covered request's handler sees: its parent
// with the client key, in one allocation rather than a context.WithValue
// layer and a value.
type keyContext struct {
	context.Context
	key     string
	claimed bool // this request holds the key's claim
}

// Value returns c itself for keyContextKey and asks the parent otherwise.
func (c *keyContext) Value(k any) any {
	if _, ok := k.(keyContextKey); ok {
		return c
	}
	return c.Context.Value(k)
}
