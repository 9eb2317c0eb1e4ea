// Package storetest is a conformance suite for implementations of
// [idempotency.Store]. Run it from a test of your own store:
//
//	func TestMyStore(t *testing.T) {
//		store := NewMyStore(...)
//		storetest.Run(t, func(t *testing.T) idempotency.Store { return store })
//	}
//
// The suite checks the contract written on [idempotency.Store]: the atomic
// claim-or-get, the owner checks of Extend, Complete and Release, lease and
// TTL expiry, Get and Delete, the exact round trip of a completed record,
// and exactly one winner among concurrent claims. Each check is a subtest
// whose name says what it proves.
//
// Every subtest uses fresh random keys and deletes them when it ends, so
// the suite is safe on a store shared with other users, such as a Redis
// server. It lets time pass through [WithAdvance], so that a store on a
// fake clock runs it in no time; on a real clock it sleeps well under a
// second per expiry check, a few seconds in all.
//
// The package uses only the standard library's testing package.
package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/f8e778d0/idempotency"
)

// Durations the suite uses. A short lease or TTL expires once the suite
// lets pastShort go by; a long one outlives any subtest by far, even when
// a fake clock shared by all subtests adds up their waits.
const (
	shortTTL  = 200 * time.Millisecond
	pastShort = 300 * time.Millisecond
	longTTL   = 10 * time.Minute

	// opTimeout bounds every store call, so a store that hangs fails the
	// suite instead of stalling it.
	opTimeout = 30 * time.Second

	// racers is how many goroutines race for one key.
	racers = 50
)

// Option adjusts [Run].
type Option func(*options)

type options struct {
	advance func(t *testing.T, d time.Duration)
}

// WithAdvance tells [Run] how to let time pass for the store: advance(t, d)
// must make the store see d more time (with miniredis, m.FastForward(d); for
// a store on a fake clock, move the clock). The suite lets time pass only
// through advance. It must act on the stores that newStore returned in the
// same subtest; the simplest way is a newStore that returns one shared store.
// Default: time.Sleep(d), for stores on a real clock.
func WithAdvance(advance func(t *testing.T, d time.Duration)) Option {
	return func(o *options) { o.advance = advance }
}

// Run runs the conformance suite against stores made by newStore, in
// subtests. newStore may return the same shared store for every subtest:
// the suite uses fresh random keys (64 lowercase hex characters, like
// [idempotency.StorageKey] produces) in every subtest and deletes them with
// Store.Delete in t.Cleanup, so it is safe on a Redis shared with other
// runs.
func Run(t *testing.T, newStore func(t *testing.T) idempotency.Store, opts ...Option) {
	t.Helper()
	o := options{advance: func(_ *testing.T, d time.Duration) { time.Sleep(d) }}
	for _, opt := range opts {
		opt(&o)
	}
	for _, c := range suiteCases {
		t.Run(c.name, func(t *testing.T) {
			c.run(&tester{t: t, store: newStore(t), advance: o.advance})
		})
	}
}

// suiteCases lists the checks, each documented where it is written.
var suiteCases = []struct {
	name string
	run  func(*tester)
}{
	{"ClaimAbsentKey", testClaimAbsentKey},
	{"ClaimInFlightByAnotherToken", testClaimInFlight},
	{"ReclaimBySameToken", testReclaimBySameToken},
	{"CompleteThenReplay", testCompleteThenReplay},
	{"CompleteByNonOwner", testCompleteByNonOwner},
	{"CompleteAbsentKey", testCompleteAbsentKey},
	{"CompleteResentBySameToken", testCompleteResent},
	{"CompleteCompletedByAnotherToken", testCompleteCompletedByOther},
	{"ReleaseByOwner", testReleaseByOwner},
	{"ReleaseByNonOwner", testReleaseByNonOwner},
	{"ReleaseCompleted", testReleaseCompleted},
	{"ExtendByNonOwner", testExtendByNonOwner},
	{"ExtendKeepsLeaseAlive", testExtendKeepsLeaseAlive},
	{"LeaseExpiryAllowsTakeover", testLeaseExpiryTakeover},
	{"ExpiredLeaseRefusesOwner", testExpiredLeaseRefusesOwner},
	{"CompletedTTLExpiry", testCompletedTTLExpiry},
	{"Get", testGet},
	{"Delete", testDelete},
	{"ConcurrentClaims", testConcurrentClaims},
	{"ConcurrentTakeover", testConcurrentTakeover},
	{"CancelledContext", testCancelledContext},
}

// testClaimAbsentKey: Claim of an absent key returns (nil, nil), and the
// key is then in flight under the claiming token; other keys are untouched.
func testClaimAbsentKey(h *tester) {
	key, a := h.key(), h.token()
	h.mustClaim(key, a, longTTL)
	h.wantInFlight(h.get(key), "Get after Claim", a, longTTL)

	other := h.key()
	if rec := h.get(other); rec != nil {
		h.t.Errorf("Get of another key after Claim: got a %v record, want nil", rec.State)
	}
	h.mustClaim(other, h.token(), longTTL)
}

// testClaimInFlight: Claim of a key in flight under another token returns
// that in-flight record, with the owner's lease left in (0, lease] (not the
// lease the second caller asked for), and takes nothing: the owner can
// still complete it.
func testClaimInFlight(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)

	rec := h.claimRecord(key, b, shortTTL)
	h.wantInFlight(rec, "Claim by another token", a, longTTL)
	if rec.LeaseRemaining <= shortTTL {
		h.t.Errorf("Claim by another token: LeaseRemaining = %v, want the owner's lease (about %v), not the caller's (%v)",
			rec.LeaseRemaining, longTTL, shortTTL)
	}

	want := sampleRecord()
	h.mustComplete(key, a, want, longTTL)
	h.wantCompleted(h.claimRecord(key, h.token(), longTTL), "Claim after the owner completed", a, want)
}

// testReclaimBySameToken: a Claim re-sent by the token that holds the key
// (a client library that retried) returns (nil, nil), and the key stays
// held by that token.
func testReclaimBySameToken(h *tester) {
	key, a := h.key(), h.token()
	h.mustClaim(key, a, longTTL)
	h.mustClaim(key, a, longTTL)
	h.wantInFlight(h.claimRecord(key, h.token(), longTTL), "Claim by another token", a, longTTL)

	want := sampleRecord()
	h.mustComplete(key, a, want, longTTL)
	// Once completed, even the owner's Claim returns the completed record.
	h.wantCompleted(h.claimRecord(key, a, longTTL), "Claim by the owner after Complete", a, want)
}

// testCompleteThenReplay: after the owner's Complete, Claim by another
// token and Get return the completed record exactly: status, headers
// (multi-valued, values containing commas, order kept), body bytes (binary,
// empty, large), fingerprint (nil, empty, binary) and NotStored. An empty
// slice and a nil one may come back either way.
func testCompleteThenReplay(h *tester) {
	binary := make([]byte, 4*256)
	for i := range binary {
		binary[i] = byte(i)
	}
	large := make([]byte, 256<<10)
	_, _ = rand.Read(large)

	cases := []struct {
		name string
		rec  idempotency.Record
	}{
		{"Headers", sampleRecord()},
		{"BinaryBody", idempotency.Record{
			Fingerprint: []byte{0, 0xff, '\n', '"', 0x80, 0},
			Response: idempotency.Response{
				StatusCode: http.StatusOK,
				Header:     http.Header{"Content-Type": {"application/octet-stream"}},
				Body:       binary,
			},
		}},
		{"EmptyBodyAndFingerprint", idempotency.Record{
			Fingerprint: []byte{},
			Response: idempotency.Response{
				StatusCode: http.StatusNoContent,
				Header:     http.Header{},
				Body:       []byte{},
			},
		}},
		{"NilBodyHeaderAndFingerprint", idempotency.Record{
			Response: idempotency.Response{StatusCode: http.StatusAccepted},
		}},
		{"LargeBody", idempotency.Record{
			Fingerprint: bytes.Repeat([]byte{0xab}, 32),
			Response: idempotency.Response{
				StatusCode: http.StatusOK,
				Header:     http.Header{"Content-Type": {"application/octet-stream"}},
				Body:       large,
			},
		}},
		{"NotStored", idempotency.Record{
			Fingerprint: []byte("fingerprint"),
			Response: idempotency.Response{
				StatusCode: http.StatusCreated,
				Header:     http.Header{"Location": {"/orders/42"}},
				NotStored:  "too large",
			},
		}},
	}
	for _, c := range cases {
		h.run(c.name, func(h *tester) {
			key, a := h.key(), h.token()
			h.mustClaim(key, a, longTTL)
			h.mustComplete(key, a, c.rec, longTTL)
			h.wantCompleted(h.claimRecord(key, h.token(), longTTL), "Claim by another token", a, c.rec)
			h.wantCompleted(h.getRecord(key), "Get", a, c.rec)
		})
	}
}

// testCompleteByNonOwner: Complete by a token that does not hold the key
// returns ErrNotOwner and writes nothing: the key stays in flight under its
// owner, who can still complete it with its own record.
func testCompleteByNonOwner(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)

	intruder := sampleRecord()
	intruder.Response.StatusCode = http.StatusTeapot
	h.wantNotOwner(h.complete(key, b, intruder, longTTL), "Complete by a non-owner")
	h.wantInFlight(h.get(key), "Get after Complete by a non-owner", a, longTTL)
	h.wantInFlight(h.claimRecord(key, h.token(), longTTL), "Claim after Complete by a non-owner", a, longTTL)

	want := sampleRecord()
	h.mustComplete(key, a, want, longTTL)
	h.wantCompleted(h.getRecord(key), "Get after the owner completed", a, want)
}

// testCompleteAbsentKey: Complete of a key nobody claimed returns
// ErrNotOwner and writes nothing: the key can then be claimed.
func testCompleteAbsentKey(h *tester) {
	key := h.key()
	h.wantNotOwner(h.complete(key, h.token(), sampleRecord(), longTTL), "Complete of an absent key")
	if rec := h.get(key); rec != nil {
		h.t.Errorf("Get after Complete of an absent key: got a %v record, want nil", rec.State)
	}
	h.mustClaim(key, h.token(), longTTL)
}

// testCompleteResent: a Complete re-sent by the token that completed the
// key returns nil and leaves the first record as it is.
func testCompleteResent(h *tester) {
	key, a := h.key(), h.token()
	h.mustClaim(key, a, longTTL)
	first := sampleRecord()
	h.mustComplete(key, a, first, longTTL)

	second := sampleRecord()
	second.Response.StatusCode = http.StatusAccepted
	second.Response.Body = []byte("second")
	if err := h.complete(key, a, second, longTTL); err != nil {
		h.t.Errorf("Complete re-sent by the same token: got %v, want nil", err)
	}
	h.wantCompleted(h.getRecord(key), "Get after a re-sent Complete", a, first)
}

// testCompleteCompletedByOther: Complete of a key completed by another
// token returns ErrNotOwner and does not overwrite the record.
func testCompleteCompletedByOther(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)
	want := sampleRecord()
	h.mustComplete(key, a, want, longTTL)

	other := sampleRecord()
	other.Response.Body = []byte("overwritten")
	h.wantNotOwner(h.complete(key, b, other, longTTL), "Complete of a key completed by another token")
	h.wantCompleted(h.getRecord(key), "Get", a, want)
}

// testReleaseByOwner: Release by the owner frees the key (Get returns nil,
// anyone may claim it); a second Release by the same token returns
// ErrNotOwner.
func testReleaseByOwner(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)
	if err := h.release(key, a); err != nil {
		h.t.Fatalf("Release by the owner: got %v, want nil", err)
	}
	if rec := h.get(key); rec != nil {
		h.t.Errorf("Get after Release: got a %v record, want nil", rec.State)
	}
	h.wantNotOwner(h.release(key, a), "second Release by the same token")
	h.mustClaim(key, b, longTTL)
	h.wantNotOwner(h.complete(key, a, sampleRecord(), longTTL), "Complete by the token that released")
}

// testReleaseByNonOwner: Release by a token that does not hold the key, or
// of an absent key, returns ErrNotOwner and deletes nothing.
func testReleaseByNonOwner(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)
	h.wantNotOwner(h.release(key, b), "Release by a non-owner")
	h.wantInFlight(h.claimRecord(key, h.token(), longTTL), "Claim after Release by a non-owner", a, longTTL)
	h.mustComplete(key, a, sampleRecord(), longTTL)

	h.wantNotOwner(h.release(h.key(), a), "Release of an absent key")
}

// testReleaseCompleted: Release never deletes a completed record: by
// another token it returns ErrNotOwner; by the token that completed it, it
// returns ErrNotOwner or nil, and the record stays.
func testReleaseCompleted(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)
	want := sampleRecord()
	h.mustComplete(key, a, want, longTTL)

	h.wantNotOwner(h.release(key, b), "Release of a completed key by another token")
	h.wantCompleted(h.getRecord(key), "Get after Release by another token", a, want)

	if err := h.release(key, a); err != nil && !errors.Is(err, idempotency.ErrNotOwner) {
		h.t.Errorf("Release of a completed key by its token: got %v, want ErrNotOwner or nil", err)
	}
	h.wantCompleted(h.claimRecord(key, b, longTTL), "Claim after Release by the completing token", a, want)
}

// testExtendByNonOwner: Extend returns ErrNotOwner for a key held by
// another token, an absent key, and a completed key (even for the token
// that completed it), and changes nothing.
func testExtendByNonOwner(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)
	h.wantNotOwner(h.extend(key, b, longTTL), "Extend by a non-owner")
	h.wantInFlight(h.claimRecord(key, b, longTTL), "Claim after Extend by a non-owner", a, longTTL)

	h.wantNotOwner(h.extend(h.key(), a, longTTL), "Extend of an absent key")

	want := sampleRecord()
	h.mustComplete(key, a, want, longTTL)
	h.wantNotOwner(h.extend(key, a, longTTL), "Extend of a completed key by its token")
	h.wantNotOwner(h.extend(key, b, longTTL), "Extend of a completed key by another token")
	h.wantCompleted(h.getRecord(key), "Get after Extend of a completed key", a, want)
}

// testExtendKeepsLeaseAlive: Extend by the owner sets the lease from now,
// so the key stays held past the end of its original lease and the owner
// can still complete it.
func testExtendKeepsLeaseAlive(h *tester) {
	key, a := h.key(), h.token()
	for attempt := 1; ; attempt++ {
		start := time.Now()
		h.mustClaim(key, a, shortTTL)
		err := h.extend(key, a, longTTL)
		if err == nil {
			break
		}
		// A real store may have seen the short lease run out before Extend
		// on a very slow run; that proves nothing, so try again.
		if time.Since(start) < shortTTL || attempt == 3 {
			h.t.Fatalf("Extend by the owner within its lease: got %v, want nil", err)
		}
		key = h.key()
	}
	rec := h.claimRecord(key, h.token(), longTTL)
	h.wantInFlight(rec, "Claim after Extend", a, longTTL)
	if rec.LeaseRemaining <= shortTTL {
		h.t.Errorf("Claim after Extend: LeaseRemaining = %v, want more than the original lease %v", rec.LeaseRemaining, shortTTL)
	}

	h.advance(h.t, pastShort)
	h.wantInFlight(h.claimRecord(key, h.token(), longTTL), "Claim past the original lease", a, longTTL)
	h.mustComplete(key, a, sampleRecord(), longTTL)
}

// testLeaseExpiryTakeover: once a lease has run out, another token claims
// the key; the stale owner's Complete, Extend and Release then return
// ErrNotOwner and neither overwrite nor free the new owner's claim, which
// completes normally.
func testLeaseExpiryTakeover(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, shortTTL)
	h.advance(h.t, pastShort)
	h.mustClaim(key, b, longTTL)

	stale := sampleRecord()
	stale.Response.Body = []byte("stale owner")
	h.wantNotOwner(h.complete(key, a, stale, longTTL), "Complete by the stale owner")
	h.wantNotOwner(h.extend(key, a, longTTL), "Extend by the stale owner")
	h.wantNotOwner(h.release(key, a), "Release by the stale owner")
	h.wantInFlight(h.get(key), "Get after the stale owner's calls", b, longTTL)

	want := sampleRecord()
	h.mustComplete(key, b, want, longTTL)
	h.wantNotOwner(h.complete(key, a, stale, longTTL), "Complete by the stale owner after the new owner completed")
	h.wantCompleted(h.getRecord(key), "Get after the new owner completed", b, want)
}

// testExpiredLeaseRefusesOwner: an owner whose lease ran out, even with no
// one else claiming the key, can no longer Complete, Extend or Release it
// (ErrNotOwner); the key reads as absent and is free to claim.
func testExpiredLeaseRefusesOwner(h *tester) {
	key, a := h.key(), h.token()
	h.mustClaim(key, a, shortTTL)
	h.advance(h.t, pastShort)

	if rec := h.get(key); rec != nil {
		h.t.Errorf("Get after the lease ran out: got a %v record, want nil", rec.State)
	}
	h.wantNotOwner(h.complete(key, a, sampleRecord(), longTTL), "Complete after the lease ran out")
	h.wantNotOwner(h.extend(key, a, longTTL), "Extend after the lease ran out")
	h.wantNotOwner(h.release(key, a), "Release after the lease ran out")
	if rec := h.get(key); rec != nil {
		h.t.Errorf("Get after the stale owner's calls: got a %v record, want nil", rec.State)
	}
	h.mustClaim(key, h.token(), longTTL)
}

// testCompletedTTLExpiry: a completed record is replayed until its TTL
// runs out; then it reads as absent, the key can be claimed again, and the
// old owner's re-sent Complete is refused.
func testCompletedTTLExpiry(h *tester) {
	key, a, b := h.key(), h.token(), h.token()
	h.mustClaim(key, a, longTTL)
	want := sampleRecord()
	start := time.Now()
	h.mustComplete(key, a, want, shortTTL)
	rec := h.get(key)
	if time.Since(start) < shortTTL { // else a slow run may have seen it expire
		h.wantCompleted(rec, "Get before the TTL ran out", a, want)
	}

	h.advance(h.t, pastShort)
	if rec := h.get(key); rec != nil {
		h.t.Errorf("Get after the TTL ran out: got a %v record, want nil", rec.State)
	}
	h.mustClaim(key, b, longTTL)
	h.wantNotOwner(h.complete(key, a, want, longTTL), "Complete re-sent by the old owner after the TTL ran out")
	h.wantInFlight(h.get(key), "Get after the key was claimed again", b, longTTL)
}

// testGet: Get returns nil for an absent key, the in-flight record (with
// its lease) for a claimed key, the completed record for a completed key,
// and nil for an expired one; it never claims the key.
func testGet(h *tester) {
	key, a := h.key(), h.token()
	if rec := h.get(key); rec != nil {
		h.t.Errorf("Get of an absent key: got a %v record, want nil", rec.State)
	}
	h.mustClaim(key, a, longTTL) // Get did not claim it

	h.wantInFlight(h.get(key), "Get of an in-flight key", a, longTTL)
	want := sampleRecord()
	h.mustComplete(key, a, want, longTTL)
	h.wantCompleted(h.getRecord(key), "Get of a completed key", a, want)

	expired := h.key()
	h.mustClaim(expired, a, shortTTL)
	h.advance(h.t, pastShort)
	if rec := h.get(expired); rec != nil {
		h.t.Errorf("Get of an expired in-flight key: got a %v record, want nil", rec.State)
	}
}

// testDelete: Delete removes a record whatever its state (in flight,
// completed, expired), after which the key is free and the old owner is
// refused; deleting an absent key is not an error.
func testDelete(h *tester) {
	h.mustDelete(h.key(), "Delete of an absent key")

	inFlight, a := h.key(), h.token()
	h.mustClaim(inFlight, a, longTTL)
	h.mustDelete(inFlight, "Delete of an in-flight key")
	if rec := h.get(inFlight); rec != nil {
		h.t.Errorf("Get after Delete of an in-flight key: got a %v record, want nil", rec.State)
	}
	h.wantNotOwner(h.complete(inFlight, a, sampleRecord(), longTTL), "Complete after Delete")
	h.mustClaim(inFlight, h.token(), longTTL)

	completed := h.key()
	h.mustClaim(completed, a, longTTL)
	h.mustComplete(completed, a, sampleRecord(), longTTL)
	h.mustDelete(completed, "Delete of a completed key")
	if rec := h.get(completed); rec != nil {
		h.t.Errorf("Get after Delete of a completed key: got a %v record, want nil", rec.State)
	}
	h.mustClaim(completed, h.token(), longTTL)
	h.mustDelete(completed, "Delete of a key claimed again")
	h.mustDelete(completed, "second Delete")

	expired := h.key()
	h.mustClaim(expired, a, shortTTL)
	h.advance(h.t, pastShort)
	h.mustDelete(expired, "Delete of an expired key")
	h.mustClaim(expired, a, longTTL)
}

// testConcurrentClaims: of racers goroutines claiming one absent key at
// once with their own tokens, exactly one gets (nil, nil); every other one
// gets the winner's in-flight record. Then the winner completes normally.
func testConcurrentClaims(h *tester) {
	key := h.key()
	winner := h.race(key)
	h.mustComplete(key, winner, sampleRecord(), longTTL)
}

// testConcurrentTakeover: of racers goroutines claiming a key whose lease
// just ran out, exactly one takes it over; the others see its claim.
func testConcurrentTakeover(h *tester) {
	key, a := h.key(), h.token()
	h.mustClaim(key, a, shortTTL)
	h.advance(h.t, pastShort)
	winner := h.race(key)
	h.wantNotOwner(h.complete(key, a, sampleRecord(), longTTL), "Complete by the stale owner")
	h.mustComplete(key, winner, sampleRecord(), longTTL)
}

// testCancelledContext: a call whose context is already cancelled may fail
// or succeed, but it leaves the store consistent: the same call repeated
// with a live context then does exactly what it would have done.
func testCancelledContext(h *tester) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	key, a, b := h.key(), h.token(), h.token()

	// Claim: either done or not; a live retry by the same token holds it.
	if rec, err := h.store.Claim(cancelled, key, a, longTTL); err == nil && rec != nil {
		h.t.Errorf("Claim of an absent key with a cancelled context: got a %v record and no error", rec.State)
	}
	h.mustClaim(key, a, longTTL)
	h.wantInFlight(h.claimRecord(key, b, longTTL), "Claim by another token", a, longTTL)

	// Extend: either done or not; the key stays held.
	if err := h.store.Extend(cancelled, key, a, longTTL); err != nil && errors.Is(err, idempotency.ErrNotOwner) {
		h.t.Errorf("Extend by the owner with a cancelled context: got %v", err)
	}
	if err := h.extend(key, a, longTTL); err != nil {
		h.t.Errorf("Extend by the owner: got %v, want nil", err)
	}

	// Complete: either done or not; a live retry completes it exactly once.
	want := sampleRecord()
	if err := h.store.Complete(cancelled, key, a, cloneRecord(want), longTTL); err != nil && errors.Is(err, idempotency.ErrNotOwner) {
		h.t.Errorf("Complete by the owner with a cancelled context: got %v", err)
	}
	h.mustComplete(key, a, want, longTTL)
	h.wantCompleted(h.getRecord(key), "Get after Complete", a, want)

	// Get: an error or the right record.
	if rec, err := h.store.Get(cancelled, key); err == nil {
		h.wantCompleted(rec, "Get with a cancelled context", a, want)
	}

	// Release: either done or not; the key ends up free.
	released := h.key()
	h.mustClaim(released, a, longTTL)
	if err := h.store.Release(cancelled, released, a); err != nil && errors.Is(err, idempotency.ErrNotOwner) {
		h.t.Errorf("Release by the owner with a cancelled context: got %v", err)
	}
	if err := h.release(released, a); err != nil && !errors.Is(err, idempotency.ErrNotOwner) {
		h.t.Errorf("Release by the owner: got %v, want nil or ErrNotOwner", err)
	}
	h.mustClaim(released, b, longTTL)

	// Delete: either done or not; a live retry deletes.
	_ = h.store.Delete(cancelled, key)
	h.mustDelete(key, "Delete")
	if rec := h.get(key); rec != nil {
		h.t.Errorf("Get after Delete: got a %v record, want nil", rec.State)
	}
}

// tester runs one subtest against one store.
type tester struct {
	t       *testing.T
	store   idempotency.Store
	advance func(t *testing.T, d time.Duration)
}

// run runs f as a subtest on the same store.
func (h *tester) run(name string, f func(*tester)) {
	h.t.Run(name, func(t *testing.T) {
		f(&tester{t: t, store: h.store, advance: h.advance})
	})
}

// key returns a fresh random key, deleted from the store when the test
// ends.
func (h *tester) key() string {
	key := randomHex(32)
	store, t := h.store, h.t
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		if err := store.Delete(ctx, key); err != nil {
			t.Errorf("cleanup: Delete: %v", err)
		}
	})
	return key
}

// token returns a fresh random owner token.
func (h *tester) token() string { return randomHex(16) }

// ctx returns the context for one store call.
func (h *tester) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(h.t.Context(), opTimeout)
}

func (h *tester) claim(key, token string, lease time.Duration) (*idempotency.Record, error) {
	ctx, cancel := h.ctx()
	defer cancel()
	return h.store.Claim(ctx, key, token, lease)
}

func (h *tester) extend(key, token string, lease time.Duration) error {
	ctx, cancel := h.ctx()
	defer cancel()
	return h.store.Extend(ctx, key, token, lease)
}

// complete passes the store a copy of rec, which the store may keep, so
// that rec stays intact for comparisons.
func (h *tester) complete(key, token string, rec idempotency.Record, ttl time.Duration) error {
	ctx, cancel := h.ctx()
	defer cancel()
	return h.store.Complete(ctx, key, token, cloneRecord(rec), ttl)
}

func (h *tester) release(key, token string) error {
	ctx, cancel := h.ctx()
	defer cancel()
	return h.store.Release(ctx, key, token)
}

// get returns what Get returns, failing the test on an error.
func (h *tester) get(key string) *idempotency.Record {
	h.t.Helper()
	ctx, cancel := h.ctx()
	defer cancel()
	rec, err := h.store.Get(ctx, key)
	if err != nil {
		h.t.Fatalf("Get: %v", err)
	}
	return rec
}

// getRecord is get that fails the test when there is no record.
func (h *tester) getRecord(key string) *idempotency.Record {
	h.t.Helper()
	rec := h.get(key)
	if rec == nil {
		h.t.Fatal("Get: got no record, want one")
	}
	return rec
}

// mustClaim fails the test unless Claim returns (nil, nil).
func (h *tester) mustClaim(key, token string, lease time.Duration) {
	h.t.Helper()
	rec, err := h.claim(key, token, lease)
	if err != nil {
		h.t.Fatalf("Claim: got error %v, want the key claimed", err)
	}
	if rec != nil {
		h.t.Fatalf("Claim: got a %v record, want the key claimed (nil, nil)", rec.State)
	}
}

// claimRecord fails the test unless Claim returns a record.
func (h *tester) claimRecord(key, token string, lease time.Duration) *idempotency.Record {
	h.t.Helper()
	rec, err := h.claim(key, token, lease)
	if err != nil {
		h.t.Fatalf("Claim: got error %v, want a record", err)
	}
	if rec == nil {
		h.t.Fatal("Claim: got the key claimed (nil, nil), want the existing record")
	}
	return rec
}

func (h *tester) mustComplete(key, token string, rec idempotency.Record, ttl time.Duration) {
	h.t.Helper()
	if err := h.complete(key, token, rec, ttl); err != nil {
		h.t.Fatalf("Complete by the owner: got %v, want nil", err)
	}
}

func (h *tester) mustDelete(key, what string) {
	h.t.Helper()
	ctx, cancel := h.ctx()
	defer cancel()
	if err := h.store.Delete(ctx, key); err != nil {
		h.t.Fatalf("%s: got %v, want nil", what, err)
	}
}

// wantNotOwner checks that err is ErrNotOwner (tested with errors.Is).
func (h *tester) wantNotOwner(err error, what string) {
	h.t.Helper()
	if !errors.Is(err, idempotency.ErrNotOwner) {
		h.t.Errorf("%s: got %v, want ErrNotOwner", what, err)
	}
}

// wantInFlight checks that rec is in flight under owner (when the store
// reports the token) with a lease left in (0, lease].
func (h *tester) wantInFlight(rec *idempotency.Record, what, owner string, lease time.Duration) {
	h.t.Helper()
	switch {
	case rec == nil:
		h.t.Errorf("%s: got no record, want an in-flight one", what)
		return
	case rec.State != idempotency.StateInFlight:
		h.t.Errorf("%s: got a %v record, want an in-flight one", what, rec.State)
		return
	}
	if rec.Token != "" && rec.Token != owner {
		h.t.Errorf("%s: got the token %q, want the owner's %q (or none)", what, rec.Token, owner)
	}
	if rec.LeaseRemaining <= 0 || rec.LeaseRemaining > lease {
		h.t.Errorf("%s: LeaseRemaining = %v, want in (0, %v]", what, rec.LeaseRemaining, lease)
	}
}

// wantCompleted checks that got is want, completed by owner.
func (h *tester) wantCompleted(got *idempotency.Record, what, owner string, want idempotency.Record) {
	h.t.Helper()
	switch {
	case got == nil:
		h.t.Errorf("%s: got no record, want a completed one", what)
		return
	case got.State != idempotency.StateCompleted:
		h.t.Errorf("%s: got a %v record, want a completed one", what, got.State)
		return
	}
	if got.Token != owner {
		h.t.Errorf("%s: Token = %q, want the completing token %q", what, got.Token, owner)
	}
	if !bytes.Equal(got.Fingerprint, want.Fingerprint) {
		h.t.Errorf("%s: Fingerprint = %x, want %x", what, got.Fingerprint, want.Fingerprint)
	}
	g, w := got.Response, want.Response
	if g.StatusCode != w.StatusCode {
		h.t.Errorf("%s: StatusCode = %d, want %d", what, g.StatusCode, w.StatusCode)
	}
	if !sameHeader(g.Header, w.Header) {
		h.t.Errorf("%s: Header = %q, want %q", what, g.Header, w.Header)
	}
	if !bytes.Equal(g.Body, w.Body) {
		h.t.Errorf("%s: Body differs: got %d bytes, want %d", what, len(g.Body), len(w.Body))
	}
	if g.NotStored != w.NotStored {
		h.t.Errorf("%s: NotStored = %q, want %q", what, g.NotStored, w.NotStored)
	}
}

// race makes racers goroutines claim key at once with their own tokens,
// checks that exactly one won and every other one saw the winner's
// in-flight record, and returns the winner's token.
func (h *tester) race(key string) string {
	h.t.Helper()
	type result struct {
		token string
		rec   *idempotency.Record
		err   error
	}
	results := make([]result, racers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range results {
		results[i].token = h.token()
		wg.Go(func() {
			<-start
			results[i].rec, results[i].err = h.claim(key, results[i].token, longTTL)
		})
	}
	close(start)
	wg.Wait()

	var winners []string
	for _, r := range results {
		switch {
		case r.err != nil:
			h.t.Errorf("concurrent Claim: %v", r.err)
		case r.rec == nil:
			winners = append(winners, r.token)
		}
	}
	if len(winners) != 1 {
		h.t.Fatalf("concurrent Claims: %d won, want exactly 1", len(winners))
	}
	for _, r := range results {
		if r.err == nil && r.rec != nil {
			h.wantInFlight(r.rec, "losing concurrent Claim", winners[0], longTTL)
		}
	}
	return winners[0]
}

// sampleRecord returns a completed record with the headers a replay must
// keep exactly: multi-valued ones in order and values containing commas.
func sampleRecord() idempotency.Record {
	return idempotency.Record{
		State:       idempotency.StateCompleted,
		Fingerprint: []byte{0x9f, 0x86, 0xd0, 0x81, 0x88, 0x4c, 0x7d, 0x65, 0x9a, 0x2f},
		Response: idempotency.Response{
			StatusCode: http.StatusCreated,
			Header: http.Header{
				"Content-Type": {"application/json; charset=utf-8"},
				"Location":     {"/orders/42"},
				"Link":         {`</a>; rel="next", </b>; rel="last"`, `</c>; rel="first"`},
				"X-Multi":      {"z", "a, b", "", "m"},
			},
			Body: []byte(`{"id":42,"status":"created"}` + "\n"),
		},
	}
}

// cloneRecord returns a deep copy of rec, keeping nil slices and maps nil.
func cloneRecord(rec idempotency.Record) *idempotency.Record {
	c := rec
	c.Fingerprint = bytes.Clone(rec.Fingerprint)
	c.Response.Header = rec.Response.Header.Clone()
	c.Response.Body = bytes.Clone(rec.Response.Body)
	return &c
}

// sameHeader reports whether a and b hold the same values in the same
// order for every name; nil and empty are the same.
func sameHeader(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for name, values := range a {
		if !slices.Equal(values, b[name]) {
			return false
		}
	}
	return true
}

// randomHex returns 2n random lowercase hex characters.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails
	return hex.EncodeToString(b)
}
