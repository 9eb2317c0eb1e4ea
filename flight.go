package idempotency

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// run executes the handler for a request that holds the claim on skey, then
// completes or releases the key.
func (h *handler) run(w http.ResponseWriter, r *http.Request, skey, key, token string, claimedAt time.Time) {
	s := h.s
	f := &flight{s: s, r: r, skey: skey, token: token}
	ctx, cancel := context.WithCancelCause(r.Context())
	f.cancel = cancel
	f.ctx = keyContext{Context: ctx, key: key, claimed: true}
	r2 := r.WithContext(&f.ctx)
	f.rec = recorder{w: w, maxBody: s.maxResponse, declLen: -1, flushed: -1}

	f.startLease(claimedAt)
	start := time.Now()
	normal := false
	defer func() {
		if !normal {
			// A panic or runtime.Goexit in the handler or a custom
			// fingerprint: release the claim so a retry can run, without
			// recovering, so the panic goes on untouched.
			f.stopLease()
			cancel(nil)
			f.release()
			s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: skey, Duration: time.Since(start), Detail: "handler panicked"})
		}
	}()
	f.watchBody(r2)
	h.next.ServeHTTP(&f.rec, r2)
	normal = true
	f.stopLease()
	cancel(nil)
	f.sealFingerprint()
	f.finish(time.Since(start))
}

// watchBody starts the request's fingerprint: a custom one is taken now;
// the default one covers what the handler reads of r's body, which it
// replaces.
func (f *flight) watchBody(r *http.Request) {
	switch {
	case f.s.fingerprint != nil:
		f.fingerprint = f.s.fingerprint(r)
	case r.Body != nil && r.Body != http.NoBody:
		f.body = bodyRecorder{body: r.Body, length: r.ContentLength, limit: f.s.fpLimit}
		f.body.hash.buf = appendFields(f.fpBuf[:0], r)
		r.Body = &f.body
	}
}

// sealFingerprint ends the default fingerprint once the handler returned.
func (f *flight) sealFingerprint() {
	switch {
	case f.body.body != nil:
		f.fingerprint = f.body.seal()
	case f.s.fingerprint == nil:
		f.fingerprint = emptyBodyFingerprint(f.r)
	}
}

// flight is the state of one claimed request while its handler runs and
// until its key is settled.
type flight struct {
	s           *settings
	r           *http.Request // as the middleware received it
	skey, token string
	ctx         keyContext              // the handler's context
	cancel      context.CancelCauseFunc // cancels ctx
	rec         recorder                // the handler's response writer
	body        bodyRecorder            // the handler's request body, when it has one
	fpBuf       [fpSmall]byte           // room for body's fingerprint message
	fingerprint []byte

	lease *lease // renews the claim while the handler runs

	// Once the handler returned: when the claim runs out, and whether it
	// may be somebody else's already.
	deadline time.Time
	lost     bool
}

// A lease renews a flight's claim every LockTTL/3 while its handler runs.
// Leases are reused, timer and all, so that a handler that returns before
// its first renewal costs no timer; a lease is reused only when its timer
// was stopped before it fired, so that no renewal can run for a flight
// that is not its own. No handler can reach a lease.
type lease struct {
	timer *time.Timer // runs renew

	mu       sync.Mutex // guards the fields below, and serialises renewals
	f        *flight    // nil while idle
	deadline time.Time  // when the claim runs out unless renewed
	stopped  bool       // the handler returned: renew no more
	lost     bool       // the claim may be somebody else's
}

var leases = sync.Pool{New: func() any {
	l := new(lease)
	l.timer = time.AfterFunc(time.Hour, l.renew)
	l.timer.Stop()
	return l
}}

// startLease arms the renewal of the claim taken at claimedAt.
func (f *flight) startLease(claimedAt time.Time) {
	l := leases.Get().(*lease)
	l.mu.Lock()
	l.f, l.deadline, l.stopped, l.lost = f, claimedAt.Add(f.s.lockTTL), false, false
	l.mu.Unlock()
	f.lease = l
	l.timer.Reset(f.s.lockTTL / 3)
}

// stopLease stops renewing the claim, waiting for a renewal under way, and
// keeps what the lease knows of the claim.
func (f *flight) stopLease() {
	l := f.lease
	l.mu.Lock()
	l.stopped = true
	idle := l.timer.Stop()
	f.deadline, f.lost = l.deadline, l.lost
	l.f = nil
	l.mu.Unlock()
	f.lease = nil
	if idle {
		leases.Put(l)
	}
}

// renew extends the lease while the handler runs. A failed renewal is
// retried while the lease lasts; once it is lost the handler's context is
// cancelled with ErrLeaseLost. A renewal waits for the store no longer
// than the lease has left, less a margin of LockTTL/10, so that the
// handler is cancelled before another request can take the key over. The
// observer hears of it after the lease's lock is let go.
func (l *lease) renew() {
	var events [2]Event
	var n int
	l.mu.Lock()
	f := l.f
	if l.stopped || l.lost || f == nil {
		l.mu.Unlock()
		return
	}
	s := f.s
	before := time.Now()
	margin := s.lockTTL / 10
	wait := max(l.deadline.Sub(before)-margin, margin)
	ctx, cancel := s.detachedContext(f.r.Context(), min(s.storeTimeout, wait))
	err := s.store.Extend(ctx, f.skey, f.token, s.lockTTL)
	cancel()
	switch {
	case err == nil:
		l.deadline = before.Add(s.lockTTL)
		l.timer.Reset(s.lockTTL / 3)
	case errors.Is(err, ErrNotOwner):
		l.lost = true
	default:
		events[n] = Event{Outcome: OutcomeStoreError, Request: f.r, StorageKey: f.skey, Err: err}
		n++
		if left := time.Until(l.deadline) - margin; left > 0 {
			l.timer.Reset(min(left/2, margin, time.Second))
		} else {
			l.lost = true
		}
	}
	if l.lost {
		f.cancel(ErrLeaseLost)
		events[n] = Event{Outcome: OutcomeLeaseLost, Request: f.r, StorageKey: f.skey, Err: err}
		n++
	}
	l.mu.Unlock()
	for _, e := range events[:n] {
		s.observe(e)
	}
}

// finish settles the key once the handler has returned: it completes it
// with the response, or with a terminal "not stored" record, or releases
// it. The observer hears of it afterwards.
func (f *flight) finish(took time.Duration) {
	s, r, rec := f.s, f.r, &f.rec
	status := rec.status()
	release := func(detail string) {
		f.release()
		s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: f.skey, Status: status, Duration: took, Detail: detail})
	}
	switch {
	case f.lost:
		// The handler was told, through ErrLeaseLost, that the key may be
		// somebody else's: what it wrote is no result to replay.
		release("lease lost")
	case rec.hijacked:
		if !rec.wrote {
			status = http.StatusSwitchingProtocols
		}
		f.complete(f.notStored(rec, status, "hijacked"), took)
	case f.body.failed && (status < 200 || status >= 400):
		// The request did not arrive whole and did not succeed: its
		// identical retry must run, not meet a 422.
		release("request body failed")
	case !s.shouldStore(status):
		release("")
	case rec.over:
		f.complete(f.notStored(rec, status, "too large"), took)
	case rec.incomplete() && r.Method != http.MethodHead:
		f.complete(f.notStored(rec, status, "incomplete"), took)
	default:
		f.complete(f.record(status), took)
	}
}

// record returns the record of the response the handler wrote, with final
// status.
func (f *flight) record(status int) *Record {
	return &Record{
		State:       StateCompleted,
		Token:       f.token,
		Fingerprint: f.fingerprint,
		Response:    Response{StatusCode: status, Header: f.s.storedHeader(&f.rec, status), Body: f.rec.buf},
	}
}

// notStored returns the terminal record of a response that reached its
// client but cannot be replayed.
func (f *flight) notStored(rec *recorder, status int, reason string) *Record {
	resp := Response{StatusCode: status, NotStored: reason}
	if loc := rec.header().Values("Location"); len(loc) > 0 {
		resp.Header = http.Header{"Location": slices.Clone(loc)}
	}
	return &Record{State: StateCompleted, Token: f.token, Fingerprint: f.fingerprint, Response: resp}
}

// storedHeader returns the header to store: the snapshot taken when the
// final header was written, under canonical names, without the headers
// that are never replayed, trailers of either kind, or Content-Length
// (replay sets it), and with the Content-Type that net/http sniffed when
// the handler set none. The snapshot is the recorder's own copy, so it is
// filtered in place.
func (s *settings) storedHeader(rec *recorder, status int) http.Header {
	h := rec.header()
	if !rec.wrote {
		h = h.Clone()
	}
	declared := h.Values("Trailer")
	for name, values := range h {
		canonical := http.CanonicalHeaderKey(name)
		switch {
		case len(name) >= len(http.TrailerPrefix) && strings.EqualFold(name[:len(http.TrailerPrefix)], http.TrailerPrefix),
			!s.replayed(canonical), isDeclaredTrailer(declared, canonical):
			delete(h, name)
		case canonical != name:
			delete(h, name)
			h[canonical] = append(h[canonical], values...)
		}
	}
	// A handler that set no Content-Type got the one net/http sniffed from
	// the first bytes it sent, or none when it flushed before any: the
	// replay must not sniff the whole body instead. A Content-Type present
	// with no value stops net/http from sniffing.
	if _, ok := h["Content-Type"]; !ok && s.replayed("Content-Type") && bodyAllowed(status) && len(rec.buf) > 0 &&
		h.Get("Content-Encoding") == "" {
		h["Content-Type"] = nil
		if ctype, ok := rec.sniffedType(); ok && rec.header().Get("Transfer-Encoding") == "" {
			h["Content-Type"] = []string{ctype}
		}
	}
	return h
}

// isDeclaredTrailer reports whether the canonical name is among the
// trailers that the Trailer header values declared.
func isDeclaredTrailer(declared []string, name string) bool {
	for _, v := range declared {
		for t := range strings.SplitSeq(v, ",") {
			if http.CanonicalHeaderKey(strings.TrimSpace(t)) == name {
				return true
			}
		}
	}
	return false
}

// complete stores rec if this request still owns the key. The first
// attempt is made here; when the store fails, the attempts go on in the
// background while the lease lasts, so that a brief store outage neither
// keeps the client waiting nor turns into a second execution.
func (f *flight) complete(rec *Record, took time.Duration) {
	err := f.tryComplete(rec)
	if err != nil && !errors.Is(err, ErrNotOwner) && !errors.Is(err, ErrStoreFull) {
		go f.completeLater(rec, took, err)
		f.s.observe(Event{Outcome: OutcomeStoreError, Request: f.r, StorageKey: f.skey, Err: err})
		return
	}
	f.completed(rec, took, err)
}

// tryComplete makes one attempt to store rec.
func (f *flight) tryComplete(rec *Record) error {
	ctx, cancel := f.s.detachedContext(f.r.Context(), f.s.storeTimeout)
	defer cancel()
	return f.s.store.Complete(ctx, f.skey, f.token, rec, f.s.ttl)
}

// completeLater retries a completion that failed with err, with backoff,
// until it succeeds or the lease, which nobody renews any more, runs out.
func (f *flight) completeLater(rec *Record, took time.Duration, err error) {
	backoff := 10 * time.Millisecond
	for {
		if time.Until(f.deadline) <= backoff {
			f.s.observe(Event{Outcome: OutcomeNotStored, Request: f.r, StorageKey: f.skey, Status: rec.Response.StatusCode,
				Detail: "store unavailable", Err: err, Duration: took})
			return
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, time.Second)
		if err = f.tryComplete(rec); err == nil || errors.Is(err, ErrNotOwner) || errors.Is(err, ErrStoreFull) {
			f.completed(rec, took, err)
			return
		}
		f.s.observe(Event{Outcome: OutcomeStoreError, Request: f.r, StorageKey: f.skey, Err: err})
	}
}

// completed reports a completion that ended with err (nil, ErrNotOwner or
// ErrStoreFull) to the observer.
func (f *flight) completed(rec *Record, took time.Duration, err error) {
	e := Event{Request: f.r, StorageKey: f.skey, Status: rec.Response.StatusCode, Duration: took, Err: err}
	switch {
	case errors.Is(err, ErrNotOwner):
		e.Outcome, e.Status = OutcomeLeaseLost, 0
	case errors.Is(err, ErrStoreFull):
		e.Outcome, e.Detail = OutcomeNotStored, "store_full"
	case rec.Response.NotStored != "":
		e.Outcome, e.Detail = OutcomeNotStored, rec.Response.NotStored
	default:
		e.Outcome = OutcomeExecuted
	}
	f.s.observe(e)
}

// release gives up the claim (only if this request still owns it) so that
// a retry runs the handler again. A release that fails leaves the claim to
// expire within LockTTL.
func (f *flight) release() {
	ctx, cancel := f.s.detachedContext(f.r.Context(), f.s.storeTimeout)
	err := f.s.store.Release(ctx, f.skey, f.token)
	cancel()
	if err != nil && !errors.Is(err, ErrNotOwner) {
		f.s.observe(Event{Outcome: OutcomeStoreError, Request: f.r, StorageKey: f.skey, Err: err})
	}
}
