package idempotency

import (
	"context"
	"errors"
	"net/http"
	"time"
)

// Errors a [Store] returns for outcomes the middleware branches on. Stores
// wrap them with %w where they add context; callers test them with
// [errors.Is].
var (
	// ErrNotOwner is returned by Extend, Complete and Release when the key
	// is not held by the given token: it is absent, its lease expired, or
	// another token claimed it since.
	ErrNotOwner = errors.New("idempotency: key is not held by this token")

	// ErrStoreFull is returned by Claim when the store refuses a new key
	// because it holds as many records or bytes as it may, and by Complete
	// when it kept a terminal "not stored" record instead of a response
	// too large for the room left. Unexpired records are never evicted to
	// make room: that would allow a second execution.
	ErrStoreFull = errors.New("idempotency: store is full")

	// ErrCorruptRecord is returned when a record exists but cannot be
	// decoded (an unknown version, a truncated value). The middleware fails
	// closed on it even when Config.FailOpen is set: the key was used, and
	// treating it as absent could run the request twice.
	ErrCorruptRecord = errors.New("idempotency: stored record is unreadable")
)

// State is the state of a [Record].
type State uint8

const (
	// StateInFlight marks a key claimed by a request that has not finished.
	StateInFlight State = 1
	// StateCompleted marks a key whose request finished; the record holds
	// the outcome to replay.
	StateCompleted State = 2
)

// String returns "in-flight", "completed" or "unknown".
func (s State) String() string {
	switch s {
	case StateInFlight:
		return "in-flight"
	case StateCompleted:
		return "completed"
	}
	return "unknown"
}

// Record is what a [Store] holds under a key.
//
// A record returned by a store is read-only to its caller: stores may hand
// out the value they hold. A record passed to Complete belongs to the store
// from then on; the caller does not modify it.
type Record struct {
	// State says whether the request is in flight or completed.
	State State

	// Token is the random owner token of the request that claimed the key.
	// A completed record keeps it so that a re-sent Complete is recognised.
	Token string

	// LeaseRemaining is, for an in-flight record returned by Claim or Get,
	// how long the owner's lease has left as the store saw it. Zero when
	// the store cannot tell.
	LeaseRemaining time.Duration

	// Fingerprint identifies the request that completed the key, so that a
	// retry with the same key and a different request can be refused. Empty
	// when fingerprinting is turned off.
	Fingerprint []byte

	// Response is the outcome of a completed request.
	Response Response
}

// Response is the stored outcome of a completed request.
type Response struct {
	// StatusCode is the final status the handler wrote; never 0.
	StatusCode int

	// Header is the response header as it was when the status was written,
	// already filtered of the headers that are never replayed.
	Header http.Header

	// Body is the response body, byte for byte.
	Body []byte

	// NotStored, when not empty, says why the response was delivered to the
	// first client but not kept ("too large", "hijacked", "incomplete",
	// "store_full"). Such a record is
	// terminal: its retries get a problem response, never a second
	// execution. StatusCode and Header (Location only) describe the
	// original response.
	NotStored string
}

// Store keeps idempotency records. Implementations must be safe for
// concurrent use by multiple goroutines, and, when shared by several
// processes, each operation must be atomic across all of them.
//
// Keys passed to a store are opaque, fixed-length strings built by the
// middleware (see [StorageKey]); they contain no client input in clear. A
// store may add its own prefix.
//
// Errors are for infrastructure failures only (a network error, a timeout,
// an unreadable record, a full store). Every expected outcome, such as a key
// held by somebody else, is a return value or [ErrNotOwner], never a
// failure to reach the store.
//
// The operations are:
//
//   - Claim atomically either takes the key for token, holding it for lease,
//     or returns the record that is there. It returns (nil, nil) when the
//     caller now holds the key: the key was absent, its completed record had
//     expired, its previous owner's lease had run out, or it was already
//     in flight under the same token (a claim re-sent by a client library
//     that retried). Otherwise it returns the live record: in flight under
//     another token (with LeaseRemaining) or completed. It returns
//     [ErrStoreFull] when the store refuses new keys for capacity and
//     [ErrCorruptRecord] (wrapped) when the existing value is unreadable.
//     There is no window between the look-up and the claim.
//
//   - Extend sets the lease of an in-flight key held by token to lease from
//     now. It returns [ErrNotOwner] when the key is absent, completed, or
//     held by another token.
//
//   - Complete replaces the in-flight record held by token with rec
//     (State StateCompleted, Token equal to token), kept for ttl. It returns
//     [ErrNotOwner] when the key is absent, its lease has expired, or
//     another token holds or completed it; in that case nothing is written.
//     Completing a key already completed by the same token returns nil and
//     leaves the record as it is, so a re-sent Complete is harmless. A
//     store bounded in bytes that cannot keep rec keeps instead a terminal
//     record (Response.NotStored "store_full", with rec's status,
//     Location header, token and fingerprint) and returns [ErrStoreFull]:
//     the key is completed, never released into a second execution.
//
//   - Release deletes the in-flight record held by token, so the next
//     request with the key runs. It returns [ErrNotOwner] when the key is
//     absent or held or completed by another token, and then deletes
//     nothing. A store keeps nothing behind for a released key.
//
//   - Get returns the live record under key, or (nil, nil) when there is
//     none or it has expired. It is for operators and tools; the request
//     path never calls it.
//
//   - Delete removes the record under key whatever its state, so that an
//     operator can clear a stuck or poisoned key. Deleting an absent key is
//     not an error.
//
// The package storetest holds a conformance suite that checks all of this
// against any implementation.
type Store interface {
	Claim(ctx context.Context, key, token string, lease time.Duration) (*Record, error)
	Extend(ctx context.Context, key, token string, lease time.Duration) error
	Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error
	Release(ctx context.Context, key, token string) error
	Get(ctx context.Context, key string) (*Record, error)
	Delete(ctx context.Context, key string) error
}
