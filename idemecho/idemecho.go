// Package idemecho puts the idempotency middleware in an echo (v4)
// server, group or route.
//
//	e := echo.New()
//	e.Use(middleware.Recover(), auth)
//	e.Use(idemecho.New(idempotency.Config{RequireKey: true},
//		idemecho.WithKeyScope(func(c echo.Context) string { return c.Get("user").(string) })))
//
// It behaves as [idempotency.New] does (see that package for keys, the
// fingerprint, what is stored and the problem responses), adapted to
// echo's handlers, which return errors:
//
//   - An error a handler returns for a request with a key is rendered
//     inside the middleware, by c.Error (the server's HTTPErrorHandler), so
//     what the client sees is what is stored and replayed. The middleware
//     then returns nil: the error has its response, and a handler further
//     out must not write a second one. Log errors in the HTTPErrorHandler,
//     which sees each once, or in a middleware behind this one. For a
//     request the middleware does not cover (another method, or no key
//     where none is required) the error is returned as usual.
//   - When the middleware answers a request itself (a replay, a 409, a
//     problem response), the handler is not called.
//   - Inside, c.Request() is the request the middleware hands down: its
//     context carries the key ([idempotency.KeyFromContext]) and the
//     claim, so an inner instance (a group's own) lets it through; and
//     c.Response() is a response that writes to the middleware's recorder.
//     Both are restored when the middleware returns; the outer
//     c.Response()'s Status, Size and Committed then describe what was
//     sent.
//   - A panic in a handler releases the key's claim and goes on to a
//     recovery middleware in front of this one (middleware.Recover).
//
// Plain echo.WrapMiddleware(idempotency.New(cfg)) is enough for handlers
// that never return an error (they write every response themselves) and
// a KeyScope that needs only the *http.Request: WrapMiddleware returns
// the handler's error to be rendered after the middleware has stored
// what was written before it, an empty 200 for a handler that wrote
// nothing.
//
// Put it after authentication and rate limiting, so that their 401s and
// 429s are not stored as the key's result.
package idemecho

import (
	"context"
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/f8e778d0/idempotency"
)

// Option configures the middleware New returns.
type Option func(*options)

type options struct {
	keyScope func(echo.Context) string
}

// WithKeyScope sets the function that returns the principal (user, tenant,
// API client) that owns a request's key, from the echo context, where an
// authentication middleware in front keeps it (c.Set). It takes the place
// of Config.KeyScope, which must then be nil. Default: Config.KeyScope.
func WithKeyScope(f func(c echo.Context) string) Option {
	return func(o *options) { o.keyScope = f }
}

// New returns echo middleware that does what [idempotency.New] with cfg
// does, for echo handlers. It panics, with a message starting "idemecho: "
// or "idempotency: ", when cfg or an option is invalid. The returned
// middleware is safe for concurrent use.
func New(cfg idempotency.Config, opts ...Option) echo.MiddlewareFunc {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if o.keyScope != nil {
		if cfg.KeyScope != nil {
			panic("idemecho: Config.KeyScope and WithKeyScope are both set")
		}
		scope := o.keyScope
		cfg.KeyScope = func(r *http.Request) string { return scope(callFrom(r).c) }
	}
	mw := idempotency.New(cfg)
	return func(next echo.HandlerFunc) echo.HandlerFunc {
		h := mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			serveNext(next, w, r)
		}))
		return func(c echo.Context) error {
			cl := &call{c: c}
			r := c.Request()
			h.ServeHTTP(c.Response(), r.WithContext(context.WithValue(r.Context(), callKey{}, cl)))
			return cl.err
		}
	}
}

type callKey struct{}

// call is one request's passage through the middleware.
type call struct {
	c   echo.Context
	err error // the handler's error, for a request without a key
}

func callFrom(r *http.Request) *call {
	return r.Context().Value(callKey{}).(*call)
}

// serveNext runs the handler with c.Request() the request the middleware
// hands down and c.Response() writing to the middleware's recorder. It
// renders the handler's error there when the request has a key, so that
// the response stored is the one sent, and otherwise leaves the error to
// be returned.
func serveNext(next echo.HandlerFunc, w http.ResponseWriter, r *http.Request) {
	cl := callFrom(r)
	c := cl.c
	origResp, origReq := c.Response(), c.Request()
	defer func() {
		c.SetResponse(origResp)
		c.SetRequest(origReq)
	}()
	c.SetRequest(r)
	c.SetResponse(echo.NewResponse(w, c.Echo()))
	err := next(c)
	if err == nil {
		return
	}
	if _, keyed := idempotency.KeyFromContext(r.Context()); keyed {
		c.Error(err)
		return
	}
	cl.err = err
}
