// Package idempotency is HTTP middleware that makes retries of
// non-idempotent requests safe, following the IETF Idempotency-Key draft.
//
// A client sends a POST, PUT or PATCH with an Idempotency-Key header. The
// first request with a key runs and its response is stored; a retry with the
// same key and the same request gets the stored response back, marked with
// X-Idempotent-Replayed: true, instead of running the handler again.
//
// # Quick start
//
//	mw := idempotency.New(idempotency.Config{})
//	http.ListenAndServe(":8080", mw(mux))
//
// New returns a standard func(http.Handler) http.Handler, so it also goes in
// a chi or gorilla/mux router with r.Use(mw).
//
// # Lifecycle
//
// For a covered request with a key, the middleware validates the key, hashes
// it with the request's scope (Config.KeyScope) into a storage key, and in
// one atomic store operation either claims the key (with a random owner
// token and a lease of Config.LockTTL) or gets the record already there. A
// completed record is replayed when the request's fingerprint matches it
// (422 otherwise); an in-flight one gets 409 with Retry-After. A claimed
// request runs the handler through a recorder that writes through to the
// client while it captures; the lease is renewed while a slow handler runs,
// and if it is lost the handler's context is cancelled with [ErrLeaseLost].
// When the handler returns, the response is stored (only if this request
// still owns the key) or, for 5xx, 408 and 429, the claim is released so a
// retry runs again. Storing happens on a context detached from the request,
// so a client that disconnects still finds its response on retry. The
// fingerprint covers the method, path, query, Content-Type and the part of
// the body the handler read: the middleware never reads a body on its own.
// A request that an outer instance of the middleware already claimed
// passes through an inner one.
//
// # Stores
//
// The default store is an in-memory [MemoryStore]. [NewRedisStore] shares
// records between instances through Redis or Redis Cluster. Any other
// backend implements [Store]; the storetest package checks it.
//
// # Errors
//
// The middleware's own errors are RFC 9457 problem details with stable type
// URIs (see [ProblemKeyRequired] and the others); Config.WriteProblem
// replaces the rendering.
package idempotency
