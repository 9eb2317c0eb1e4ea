// Package idemgin puts the idempotency middleware in a gin engine, route
// group or route.
//
//	r := gin.New()
//	r.Use(gin.Recovery(), auth)
//	r.Use(idemgin.New(idempotency.Config{RequireKey: true},
//		idemgin.WithKeyScope(func(c *gin.Context) string { return c.GetString("user") })))
//
// It behaves as [idempotency.New] does (see that package for keys, the
// fingerprint, what is stored and the problem responses), adapted to
// gin's way of writing a response:
//
//   - gin keeps the status pending (the last c.Status wins) until the
//     first byte of the body or the end of the chain. The handlers after
//     this middleware run with a c.Writer that keeps it pending too, until
//     c.Next returns; the status gin would then send is the one stored.
//     Once a covered request's response is settled it is sent, so a
//     middleware in front of this one cannot change the status of a
//     response that is already stored.
//   - When the middleware answers a request itself (a replay, a 409, a
//     problem response), it calls c.Abort: the handlers after it do not
//     run.
//   - c.Writer's Status, Size and Written stay truthful, inside the chain
//     and after it, and c.Request inside the chain is the request the
//     middleware hands down: its context carries the key
//     ([idempotency.KeyFromContext]) and the claim, so an inner instance
//     of the middleware (a route group's own) lets it through. Both are
//     restored when this middleware returns.
//   - A panic in a handler releases the key's claim and goes on to a
//     recovery middleware in front of this one (gin.Recovery), as it would
//     without this middleware.
//
// Put it after authentication and rate limiting, so that their 401s and
// 429s are not stored as the key's result. HTTP/2 server push is not
// offered inside it (c.Writer.Pusher returns nil): a replay could not
// repeat a push.
package idemgin

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"

	"github.com/gin-gonic/gin"

	"github.com/f8e778d0/idempotency"
)

// Option configures the middleware New returns.
type Option func(*options)

type options struct {
	keyScope func(*gin.Context) string
}

// WithKeyScope sets the function that returns the principal (user, tenant,
// API client) that owns a request's key, from the gin context, where an
// authentication middleware in front keeps it (c.Set). It takes the place
// of Config.KeyScope, which must then be nil. Default: Config.KeyScope.
func WithKeyScope(f func(c *gin.Context) string) Option {
	return func(o *options) { o.keyScope = f }
}

// New returns gin middleware that does what [idempotency.New] with cfg
// does, for gin handlers. It panics, with a message starting "idemgin: "
// or "idempotency: ", when cfg or an option is invalid. The returned
// handler is safe for concurrent use.
func New(cfg idempotency.Config, opts ...Option) gin.HandlerFunc {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if o.keyScope != nil {
		if cfg.KeyScope != nil {
			panic("idemgin: Config.KeyScope and WithKeyScope are both set")
		}
		scope := o.keyScope
		cfg.KeyScope = func(r *http.Request) string { return scope(callFrom(r).c) }
	}
	h := idempotency.New(cfg)(http.HandlerFunc(serveChain))
	return func(c *gin.Context) {
		cl := &call{c: c}
		h.ServeHTTP(c.Writer, c.Request.WithContext(context.WithValue(c.Request.Context(), callKey{}, cl)))
		if !cl.ran {
			c.Abort() // the middleware answered: replay, 409, problem
		}
		if !cl.ran || cl.keyed {
			// The response is settled (stored, or released for a retry):
			// what the client gets is what was decided.
			c.Writer.WriteHeaderNow()
		}
	}
}

type callKey struct{}

// call is one request's passage through the middleware.
type call struct {
	c     *gin.Context
	ran   bool // the rest of the chain ran
	keyed bool // it ran with a key: its response is the key's
}

func callFrom(r *http.Request) *call {
	return r.Context().Value(callKey{}).(*call)
}

// serveChain is the http.Handler the middleware wraps: the rest of the gin
// chain, with c.Writer writing to the middleware's recorder and c.Request
// the request the middleware hands down.
func serveChain(w http.ResponseWriter, r *http.Request) {
	cl := callFrom(r)
	cl.ran = true
	_, cl.keyed = idempotency.KeyFromContext(r.Context())
	c := cl.c
	origW, origR := c.Writer, c.Request
	rw := &responseWriter{w: w, outer: origW, size: -1, status: http.StatusOK}
	if !origW.Written() {
		rw.status = origW.Status() // a status set in front of this middleware
	}
	c.Writer, c.Request = rw, r
	defer func() { c.Writer, c.Request = origW, origR }()
	c.Next()
	rw.WriteHeaderNow() // the status gin would send after the chain
}

// responseWriter is the gin.ResponseWriter the handlers after the
// middleware write to. Like gin's own, it keeps the status pending until
// the body starts or WriteHeaderNow is called.
type responseWriter struct {
	w      http.ResponseWriter // the middleware's recorder
	outer  gin.ResponseWriter  // c.Writer in front of the middleware
	size   int                 // -1 until the header is written
	status int
}

var _ gin.ResponseWriter = (*responseWriter)(nil)

// Header returns the header map of the response.
func (rw *responseWriter) Header() http.Header { return rw.w.Header() }

// WriteHeader sets the pending status; once the header is written it is
// ignored, as gin does.
func (rw *responseWriter) WriteHeader(code int) {
	if code > 0 && !rw.Written() {
		rw.status = code
	}
}

// WriteHeaderNow writes the header with the pending status, once.
func (rw *responseWriter) WriteHeaderNow() {
	if !rw.Written() {
		rw.size = 0
		rw.w.WriteHeader(rw.status)
	}
}

// Write writes the header if needed, then data.
func (rw *responseWriter) Write(data []byte) (int, error) {
	rw.WriteHeaderNow()
	n, err := rw.w.Write(data)
	rw.size += n
	return n, err
}

// WriteString writes the header if needed, then s.
func (rw *responseWriter) WriteString(s string) (int, error) {
	rw.WriteHeaderNow()
	n, err := io.WriteString(rw.w, s)
	rw.size += n
	return n, err
}

// Status returns the pending or written status.
func (rw *responseWriter) Status() int { return rw.status }

// Size returns the number of body bytes written, or -1 before the header.
func (rw *responseWriter) Size() int { return rw.size }

// Written reports whether the header was written.
func (rw *responseWriter) Written() bool { return rw.size != -1 }

// Flush writes the header if needed and flushes what was written.
func (rw *responseWriter) Flush() {
	rw.WriteHeaderNow()
	_ = http.NewResponseController(rw.w).Flush()
}

// Hijack takes over the connection, as gin allows before the body
// starts. The middleware completes a hijacked request's key as not stored.
func (rw *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if rw.size > 0 {
		return nil, nil, errHijackAfterBody
	}
	if rw.size < 0 {
		rw.size = 0
	}
	return http.NewResponseController(rw.w).Hijack()
}

// CloseNotify returns the channel of the writer in front of the
// middleware.
func (rw *responseWriter) CloseNotify() <-chan bool {
	return rw.outer.CloseNotify()
}

// Pusher returns nil: a replay could not repeat a server push.
func (rw *responseWriter) Pusher() http.Pusher { return nil }

// Unwrap returns the middleware's recorder, for http.ResponseController.
func (rw *responseWriter) Unwrap() http.ResponseWriter { return rw.w }

var errHijackAfterBody = errors.New("idemgin: response body already written")
