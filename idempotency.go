package idempotency

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// ReplayedHeader is set to "true" on every replayed response and never on a
// first execution.
const ReplayedHeader = "X-Idempotent-Replayed"

// ErrLeaseLost is the cause of a handler's request context being cancelled
// because its claim on the key expired and could not be renewed: another
// request may now own the key. Handlers test it with
// errors.Is(context.Cause(ctx), ErrLeaseLost) before irreversible work.
var ErrLeaseLost = errors.New("idempotency: lease on the key was lost")

// New returns middleware that makes covered requests (POST, PUT and PATCH by
// default) that carry an idempotency key safe to retry: the first request
// with a key runs and its response is stored; a retry with the same key and
// the same request gets the stored response, marked with
// X-Idempotent-Replayed: true. See [Config] for the knobs; the zero Config
// works. New panics, with a message starting "idempotency: ", when cfg is
// invalid. The returned middleware is safe for concurrent use.
func New(cfg Config) func(http.Handler) http.Handler {
	s := newSettings(cfg)
	tokens := newTokenSource()
	flights := &sync.Pool{New: func() any { return newFlight(s) }}
	return func(next http.Handler) http.Handler {
		if next == nil {
			panic("idempotency: nil handler")
		}
		return &handler{s: s, tokens: tokens, flights: flights, next: next}
	}
}

// KeyFromContext returns the client's idempotency key of the request whose
// context ctx is, as the handler sees it, and whether there is one.
func KeyFromContext(ctx context.Context) (string, bool) {
	key, ok := ctx.Value(keyContextKey{}).(string)
	return key, ok
}

type keyContextKey struct{}

// keyContext carries the client key without a separate context.WithValue
// layer, for a request that runs unprotected (FailOpen).
type keyContext struct {
	context.Context
	key string
}

func (c *keyContext) Value(k any) any {
	if _, ok := k.(keyContextKey); ok {
		return c.key
	}
	return c.Context.Value(k)
}

type handler struct {
	s       *settings
	tokens  *tokenSource
	flights *sync.Pool // of idle *flight for s
	next    http.Handler
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s := h.s
	if !s.covers(r.Method) {
		h.next.ServeHTTP(w, r)
		return
	}

	// 1. The key.
	values := r.Header[s.headerKey]
	if len(values) == 0 {
		if s.requireKey {
			s.observe(Event{Outcome: OutcomeKeyMissing, Request: r, Status: http.StatusBadRequest})
			s.writeProblem(w, r, s.problem(ProblemKeyRequired, http.StatusBadRequest, s.detailKeyRequired))
			return
		}
		s.observe(Event{Outcome: OutcomeKeyMissing, Request: r})
		h.next.ServeHTTP(w, r)
		return
	}
	key, err := parseKey(s.headerName, values)
	if err != nil {
		detail := err.Error()
		var ke *keyError
		if errors.As(err, &ke) {
			detail = ke.detail
		}
		s.observe(Event{Outcome: OutcomeKeyInvalid, Request: r, Status: http.StatusBadRequest, Detail: detail})
		s.writeProblem(w, r, s.problem(ProblemKeyInvalid, http.StatusBadRequest, detail))
		return
	}

	// 2. The storage key, from scope and key.
	var scope string
	if s.keyScope != nil {
		scope = s.keyScope(r)
	}
	// The storage key and this request's owner token share one
	// allocation: a store that keeps the claim keeps both.
	var buf [2*sha256.Size + tokenLen]byte
	b := h.tokens.append(appendStorageKey(buf[:0], scope, key))
	both := string(b)
	skey, token := both[:2*sha256.Size], both[2*sha256.Size:]

	// 3. Claim the key, or get the record that is there, in one operation.
	claimedAt := monoNow()
	// A store of this package hands a completed record over encoded, and
	// it is replayed in place.
	var (
		rec *Record
		enc string
	)
	ctx, cancel := s.storeContext(r.Context())
	if s.encStore != nil {
		rec, enc, err = s.encStore.claimEncoded(ctx, skey, token, s.lockTTL)
	} else {
		rec, err = s.store.Claim(ctx, skey, token, s.lockTTL)
	}
	cancel()
	if s.wait > 0 && err == nil && rec != nil && rec.State == StateInFlight {
		rec, claimedAt, err = s.awaitInFlight(r.Context(), skey, token, rec)
	}
	if err == nil && rec != nil && rec.State == StateCompleted {
		enc = encodeRecord("", rec)
	}
	var rv recordView
	if err == nil && enc != "" {
		rv, err = viewRecord(enc)
	}
	switch {
	case err != nil:
		h.claimFailed(w, r, skey, key, err)
	case enc != "":
		h.replay(w, r, skey, &rv)
	case rec == nil:
		h.run(w, r, skey, key, token, claimedAt)
	default:
		s.conflict(w, r, skey, rec)
	}
}

// claimFailed answers a request whose claim could not be made.
func (h *handler) claimFailed(w http.ResponseWriter, r *http.Request, skey, key string, err error) {
	s := h.s
	if errors.Is(err, ErrStoreFull) {
		s.observe(Event{Outcome: OutcomeStoreFull, Request: r, StorageKey: skey, Status: http.StatusServiceUnavailable, Err: err})
		p := s.problem(ProblemStoreFull, http.StatusServiceUnavailable, "The idempotency store is full")
		p.RetryAfter, p.Err = s.retryAfter, err
		s.writeProblem(w, r, p)
		return
	}
	// An unreadable record means the key was used: fail closed whatever
	// FailOpen says.
	if s.failOpen && !errors.Is(err, ErrCorruptRecord) && r.Context().Err() == nil {
		s.observe(Event{Outcome: OutcomeStoreError, Request: r, StorageKey: skey, Err: err})
		h.next.ServeHTTP(w, r.WithContext(&keyContext{Context: r.Context(), key: key}))
		return
	}
	s.observe(Event{Outcome: OutcomeStoreError, Request: r, StorageKey: skey, Status: http.StatusServiceUnavailable, Err: err})
	p := s.problem(ProblemStoreUnavailable, http.StatusServiceUnavailable, "The idempotency store is unavailable")
	p.RetryAfter, p.Err = s.retryAfter, err
	s.writeProblem(w, r, p)
}

// conflict answers a request whose key is in flight.
func (s *settings) conflict(w http.ResponseWriter, r *http.Request, skey string, rec *Record) {
	s.observe(Event{Outcome: OutcomeConflict, Request: r, StorageKey: skey, Status: http.StatusConflict})
	p := s.problem(ProblemInProgress, http.StatusConflict, s.detailInProgress)
	p.RetryAfter = s.retryAfter
	if left := rec.LeaseRemaining; left > 0 && left < p.RetryAfter {
		p.RetryAfter = left
	}
	s.writeProblem(w, r, p)
}

// replay answers a request whose key is completed: the stored response, a
// 422 when the request differs, or the not-stored problem.
func (h *handler) replay(w http.ResponseWriter, r *http.Request, skey string, rv *recordView) {
	s := h.s
	if len(rv.fingerprint) > 0 && !s.fpDisabled {
		if !s.matches(r, rv.fingerprint) {
			s.observe(Event{Outcome: OutcomeMismatch, Request: r, StorageKey: skey, Status: http.StatusUnprocessableEntity})
			s.writeProblem(w, r, s.problem(ProblemKeyReused, http.StatusUnprocessableEntity, s.detailKeyReused))
			return
		}
	}
	if rv.notStored != "" {
		s.observe(Event{Outcome: OutcomeNotStoredReplay, Request: r, StorageKey: skey, Status: http.StatusInternalServerError, Detail: rv.notStored})
		p := s.problem(ProblemNotStored, http.StatusInternalServerError,
			"The original response was not stored ("+rv.notStored+") and cannot be replayed")
		p.OriginalStatus = rv.status
		p.Location = rv.first("Location")
		s.writeProblem(w, r, p)
		return
	}
	s.observe(Event{Outcome: OutcomeReplayed, Request: r, StorageKey: skey, Status: rv.status})
	writeStored(w, rv)
}

// matches reports whether r has the fingerprint want. A body that cannot be
// read does not match: a response is replayed only to a request known to be
// the same.
func (s *settings) matches(r *http.Request, want string) bool {
	if s.fingerprint != nil {
		return string(s.fingerprint(r)) == want
	}
	got, ok := fingerprintRequest(r, s.fpLimit)
	return ok && string(got[:]) == want
}

// writeStored writes a stored response. The header values are new slices,
// one backing array for all, so the writer never holds a slice of the
// record; the strings are the record's, which no one can change.
func writeStored(w http.ResponseWriter, rv *recordView) {
	h := w.Header()
	vals := make([]string, 0, rv.nValues+2)
	c := rv.fields()
	for {
		name, n, ok := c.next()
		if !ok {
			break
		}
		i := len(vals)
		for range n {
			vals = append(vals, c.value())
		}
		h[name] = vals[i:len(vals):len(vals)]
	}
	if bodyAllowed(rv.status) {
		if cl := h["Content-Length"]; len(cl) != 1 || !isDecimal(cl[0], len(rv.body)) {
			i := len(vals)
			vals = append(vals, strconv.Itoa(len(rv.body)))
			h["Content-Length"] = vals[i : i+1 : i+1]
		}
	} else {
		delete(h, "Content-Length")
	}
	i := len(vals)
	vals = append(vals, "true")
	h[ReplayedHeader] = vals[i : i+1 : i+1]
	w.WriteHeader(rv.status)
	if len(rv.body) > 0 && bodyAllowed(rv.status) {
		_, _ = io.WriteString(w, rv.body)
	}
}

// bodyAllowed reports whether a response with status may carry a body.
func bodyAllowed(status int) bool {
	return status >= 200 && status != http.StatusNoContent && status != http.StatusNotModified
}

// isDecimal reports whether s is the decimal form of n, without allocating.
func isDecimal(s string, n int) bool {
	v, err := strconv.Atoi(s)
	return err == nil && v == n
}

// run executes the handler for a request that holds the claim, then
// completes or releases the key.
//
// Its per-request state comes from a pool: a flight holds the recorder, the
// body fingerprint and a renewal timer made once per flight, so a handler
// that returns within LockTTL/3 costs no goroutine and no timer allocation.
// The handler's context is the one allocation that cannot be pooled, since
// the handler may keep it; see leaseContext.
func (h *handler) run(w http.ResponseWriter, r *http.Request, skey, key, token string, claimedAt monoTime) {
	s := h.s
	ctx := &leaseContext{Context: r.Context(), key: key}
	r2 := r.WithContext(ctx)
	f := h.flights.Get().(*flight)
	f.skey, f.token, f.r, f.ctx, f.detached = skey, token, r2, ctx, r.Context()

	// The flight is idle: its timer is stopped and no renewal can run
	// until the Reset below, which publishes what is set before it.
	f.done = false
	f.leaseDeadline = claimedAt.add(s.lockTTL)
	f.timer.Reset(s.lockTTL / 3)

	start := s.handlerStart()
	normal := false
	defer func() {
		if !normal {
			// A panic or runtime.Goexit, in the handler or a custom
			// fingerprint: release the claim so a retry can run, without
			// recovering, so the panic goes on untouched. The flight is
			// not reused.
			ctx.view.cut()
			f.stopRenewal()
			f.release()
			ctx.end()
			s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: skey, Duration: s.handlerTook(start), Detail: "handler panicked"})
		}
	}()
	switch {
	case s.fpDisabled:
	case s.fingerprint != nil:
		f.customFP = s.fingerprint(r2)
	default:
		f.bodyFP = true
		f.fp.init(r2, s.fpLimit)
		if r2.Body == io.ReadCloser(&f.fp) {
			r2.Body = &ctx.view.b
		}
	}
	f.rec.init(w, s.maxResponse, f.beforeFinalFunc)
	ctx.view.init(&f.rec, &f.fp)
	h.next.ServeHTTP(&ctx.view.w, r2)
	ctx.view.cut()
	if f.bodyFP {
		// Hash what is left of the body's first bytes while the lease is
		// still renewed: a slow client must not cost the claim.
		f.fp.sum()
	}
	normal = true
	reusable := f.stopRenewal()
	f.finish(r, s.handlerTook(start))
	ctx.end()
	if reusable {
		f.reset()
		h.flights.Put(f)
	}
}

// flight is the state of one claimed request while its handler runs. It is
// pooled: newFlight makes the parts that live as long as the flight (the
// renewal timer, the beforeFinal callback), reset clears the rest.
type flight struct {
	s        *settings
	skey     string
	token    string
	r        *http.Request // as the handler sees it
	ctx      *leaseContext // r's context
	detached context.Context
	rec      recorder
	fp       bodyFingerprint
	bodyFP   bool
	customFP []byte

	// enc is the encoded record for the store; fpBuf and oneValue are room
	// for its parts, so that building it allocates nothing.
	enc      []byte
	fpBuf    [sha256.Size + 1]byte
	oneValue [1]string

	beforeFinalFunc func() // f.beforeFinal, bound once

	mu            sync.Mutex  // guards the fields below, and serialises renewals
	timer         *time.Timer // runs renew; stopped while the flight is idle
	done          bool
	leaseDeadline monoTime // when the claim runs out unless renewed
	leaseLost     bool
}

// newFlight returns an idle flight for s, with its timer stopped.
func newFlight(s *settings) *flight {
	f := &flight{s: s}
	f.beforeFinalFunc = f.beforeFinal
	f.timer = time.AfterFunc(time.Hour, f.renew)
	f.timer.Stop()
	return f
}

// reset drops every reference f holds to its request, for the pool. Its
// timer is stopped and no renewal is running or pending (stopRenewal
// reported it).
func (f *flight) reset() {
	f.skey, f.token, f.r, f.ctx, f.detached = "", "", nil, nil, nil
	f.rec.reset()
	f.fp.reset()
	f.bodyFP, f.customFP = false, nil
	f.enc = f.enc[:0]
	if cap(f.enc) > recMaxPooledBuf {
		f.enc = nil
	}
	f.oneValue[0] = ""
	f.leaseDeadline, f.leaseLost = 0, false
}

// beforeFinal runs just before the final response header goes out. On
// HTTP/1.x, net/http may then discard a request body the handler has not
// read, so the part of it the fingerprint needs is read ahead first.
func (f *flight) beforeFinal() {
	if f.bodyFP && f.r.ProtoMajor == 1 && !f.rec.fullDuplex() {
		// Under the body's lock, as a Read from another goroutine of the
		// handler would be. The writer's lock is held already: always
		// writer, then body.
		b := &f.ctx.view.b
		b.mu.Lock()
		f.fp.readAhead()
		b.mu.Unlock()
	}
}

// storeContext returns the context for one store call: bounded by
// StoreTimeout for a store that can block.
func (s *settings) storeContext(parent context.Context) (context.Context, context.CancelFunc) {
	if !s.boundedStore {
		return parent, func() {}
	}
	return context.WithTimeout(parent, s.storeTimeout)
}

// detachedContext is for completion, renewal and release: it outlives the
// request, so a client that hangs up mid-request still gets its response
// stored, and it is bounded by timeout for a store that can block.
func (s *settings) detachedContext(parent context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	if !s.boundedStore {
		return context.Background(), func() {}
	}
	return context.WithTimeout(context.WithoutCancel(parent), timeout)
}

// renew extends the lease every LockTTL/3 while the handler runs. A failed
// renewal is retried while the lease lasts; once it is lost the handler's
// context is cancelled with ErrLeaseLost. A renewal waits for the store no
// longer than the lease has left, less a margin of LockTTL/10: a store that
// hangs costs the lease, and the handler is cancelled before another
// request can take the key over.
func (f *flight) renew() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done || f.leaseLost {
		return
	}
	s := f.s
	before := monoNow()
	margin := s.lockTTL / 10
	wait := max(f.leaseDeadline.sub(before)-margin, margin)
	ctx, cancel := s.detachedContext(f.detached, min(s.storeTimeout, wait))
	err := s.store.Extend(ctx, f.skey, f.token, s.lockTTL)
	cancel()
	switch {
	case err == nil:
		f.leaseDeadline = before.add(s.lockTTL)
		f.timer.Reset(s.lockTTL / 3)
	case errors.Is(err, ErrNotOwner):
		f.loseLease(err)
	default:
		s.observe(Event{Outcome: OutcomeStoreError, Request: f.r, StorageKey: f.skey, Err: err})
		left := f.leaseDeadline.sub(monoNow()) - s.lockTTL/10
		if left <= 0 {
			f.loseLease(err)
			return
		}
		f.timer.Reset(min(left/2, s.lockTTL/10, time.Second))
	}
}

// loseLease records that the claim is gone. Called with f.mu held.
func (f *flight) loseLease(err error) {
	f.leaseLost = true
	f.ctx.cancel(ErrLeaseLost)
	f.s.observe(Event{Outcome: OutcomeLeaseLost, Request: f.r, StorageKey: f.skey, Err: err})
}

// stopRenewal stops the renewal timer and waits for a renewal under way.
// It reports whether the timer was still pending: when it had fired, a
// renewal may yet be waiting for f.mu (it will find done and return), so the
// flight must not be reused for another request.
func (f *flight) stopRenewal() bool {
	f.mu.Lock()
	f.done = true
	stopped := f.timer.Stop()
	f.mu.Unlock()
	return stopped
}

// finish completes or releases the key after the handler returned.
func (f *flight) finish(r *http.Request, took time.Duration) {
	s := f.s
	rec := &f.rec
	status := rec.status()
	if f.leaseLost {
		// The handler was told, through ErrLeaseLost, that the key may be
		// somebody else's: what it wrote is no result to replay. Give the
		// claim back if it is still ours; never overwrite a new owner.
		f.release()
		s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: f.skey, Status: status, Duration: took, Detail: "lease lost"})
		return
	}
	switch {
	case rec.hijacked():
		if !rec.wroteHeader() {
			status = http.StatusSwitchingProtocols
		}
		f.completeNotStored(r, status, "hijacked", took)
	case !s.shouldStore(status):
		f.release()
		s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: f.skey, Status: status, Duration: took})
	case rec.overflowed():
		f.completeNotStored(r, status, "too large", took)
	default:
		f.enc = f.appendStored(f.enc[:0], status)
		if f.complete(r, status, took) {
			s.observe(Event{Outcome: OutcomeExecuted, Request: r, StorageKey: f.skey, Status: status, Duration: took})
		}
	}
}

// fingerprint returns the request's fingerprint as the record keeps it:
// none, the custom one, or the default digest. It may alias f.
func (f *flight) fingerprint() []byte {
	switch {
	case f.customFP != nil:
		return f.customFP
	case f.bodyFP:
		sum, ok := f.fp.sum()
		n := copy(f.fpBuf[:], sum[:])
		if !ok {
			// The body failed before its first bytes were all read: the
			// request cannot be verified, so no retry may be taken for it.
			// A fingerprint one byte longer than any digest never matches:
			// retries get 422 rather than a response to a request that
			// may not be theirs.
			f.fpBuf[n] = 0xff
			n++
		}
		return f.fpBuf[:n]
	}
	return nil
}

// appendStored appends the record of the response the recorder captured,
// with final status, to dst. Its header is the snapshot taken when the
// final header was written, without the headers that are never replayed,
// with the exact Content-Length, and with the Content-Type net/http sniffed
// when the handler set none.
func (f *flight) appendStored(dst []byte, status int) []byte {
	snap, body := f.rec.header(), f.rec.body()
	keep := f.s.replayed

	// A handler that set no Content-Type got the one net/http sniffed from
	// the first bytes it sent, or none when it flushed before writing any.
	// The replay must not sniff the whole body instead.
	var ctype []string
	_, haveType := snap.get("Content-Type")
	_, haveTE := snap.get("Transfer-Encoding")
	enc, _ := snap.get("Content-Encoding")
	addType := !haveType && len(body) > 0 && bodyAllowed(status) && (len(enc) == 0 || enc[0] == "") && keep("Content-Type")
	if addType {
		if sniffed, ok := f.rec.sniffedType(); ok && !haveTE {
			f.oneValue[0] = sniffed
			ctype = f.oneValue[:]
		}
		// else present and empty: nothing is sniffed
	}

	nNames, nValues := 1, 1 // Content-Length
	if addType {
		nNames, nValues = nNames+1, nValues+len(ctype)
	}
	snap.each(func(name string, values []string) {
		if keep(name) {
			nNames, nValues = nNames+1, nValues+len(values)
		}
	})
	dst = appendRecordStart(dst, f.token, status, "", nNames, nValues)
	snap.each(func(name string, values []string) {
		if keep(name) {
			dst = appendHeaderField(dst, name, values)
		}
	})
	if addType {
		dst = appendHeaderField(dst, "Content-Type", ctype)
	}
	var digits [20]byte
	length := strconv.AppendInt(digits[:0], int64(len(body)), 10)
	dst = appendRecordString(dst, "Content-Length")
	dst = append(dst, 1, byte(len(length))) // one value, of fewer than 128 bytes
	dst = append(dst, length...)
	return appendRecordEnd(dst, f.fingerprint(), body)
}

// completeNotStored completes the key with a terminal record: the response
// went to the client but cannot be replayed.
func (f *flight) completeNotStored(r *http.Request, status int, reason string, took time.Duration) {
	loc, _ := f.rec.header().get("Location")
	if len(loc) > 0 {
		f.enc = appendRecordStart(f.enc[:0], f.token, status, reason, 1, len(loc))
		f.enc = appendHeaderField(f.enc, "Location", loc)
	} else {
		f.enc = appendRecordStart(f.enc[:0], f.token, status, reason, 0, 0)
	}
	f.enc = appendRecordEnd(f.enc, f.fingerprint(), nil)
	if f.complete(r, status, took) {
		f.s.observe(Event{Outcome: OutcomeNotStored, Request: r, StorageKey: f.skey, Status: status, Detail: reason, Duration: took})
	}
}

// complete stores the record in f.enc if this request still owns the key,
// retrying with backoff while the lease lasts, so that a brief store outage
// does not turn into a second execution. It reports whether the record was
// stored; when it gives up on a store that keeps failing, it reports the
// response (of status, from a handler that ran for took) as not stored.
func (f *flight) complete(r *http.Request, status int, took time.Duration) bool {
	s := f.s
	var rec *Record
	if s.encStore == nil {
		// A store of the user's: hand it a Record of its own. The
		// encoding was made above, so this cannot fail.
		rv, err := viewRecord(string(f.enc))
		if err != nil {
			panic("idempotency: a record just encoded does not decode: " + err.Error())
		}
		rec = rv.detachedRecord()
	}
	backoff := 10 * time.Millisecond
	for {
		ctx, cancel := s.detachedContext(f.detached, s.storeTimeout)
		var err error
		if rec == nil {
			err = s.encStore.completeEncoded(ctx, f.skey, f.token, f.enc, s.ttl)
		} else {
			err = s.store.Complete(ctx, f.skey, f.token, rec, s.ttl)
		}
		cancel()
		switch {
		case err == nil:
			return true
		case errors.Is(err, ErrNotOwner):
			if !f.leaseLost {
				f.leaseLost = true
				s.observe(Event{Outcome: OutcomeLeaseLost, Request: r, StorageKey: f.skey, Err: err})
			}
			return false
		}
		s.observe(Event{Outcome: OutcomeStoreError, Request: r, StorageKey: f.skey, Err: err})
		if f.leaseDeadline.sub(monoNow()) <= backoff {
			s.observe(Event{Outcome: OutcomeNotStored, Request: r, StorageKey: f.skey, Status: status,
				Detail: "store unavailable", Err: err, Duration: took})
			return false
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, time.Second)
	}
}

// release gives up the claim (only if this request still owns it) so that
// a retry runs the handler again. A release that fails leaves the claim to
// expire within LockTTL.
func (f *flight) release() {
	s := f.s
	ctx, cancel := s.detachedContext(f.detached, s.storeTimeout)
	err := s.store.Release(ctx, f.skey, f.token)
	cancel()
	if err != nil && !errors.Is(err, ErrNotOwner) {
		s.observe(Event{Outcome: OutcomeStoreError, Request: f.r, StorageKey: f.skey, Err: err})
	}
}

// tokenSource makes owner tokens: a random per-middleware prefix and a
// counter, unique without a system call per request. A token is 27
// characters of the URL-safe base64 alphabet (16 for 96 random bits, 11 for
// the counter), short enough for the 32-byte size class of the allocator,
// since a store keeps one per record.
type tokenSource struct {
	prefix [tokenPrefixLen]byte
	n      atomic.Uint64
}

const (
	tokenPrefixLen = 16 // base64 of 12 random bytes
	tokenLen       = tokenPrefixLen + 11
)

func newTokenSource() *tokenSource {
	var b [12]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand panics instead)
	t := &tokenSource{}
	base64.RawURLEncoding.Encode(t.prefix[:], b[:])
	return t
}

// append appends a new token to dst.
func (t *tokenSource) append(dst []byte) []byte {
	const digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	var buf [tokenLen]byte
	copy(buf[:], t.prefix[:])
	n := t.n.Add(1)
	for i := tokenLen - 1; i >= tokenPrefixLen; i-- {
		buf[i] = digits[n&63]
		n >>= 6
	}
	return append(dst, buf[:]...)
}

// monoTime is a reading of the monotonic clock: the time since monoEpoch.
// It costs one clock read, where time.Now reads the wall clock too.
type monoTime time.Duration

var monoEpoch = time.Now()

// monoNow returns the monotonic clock now.
func monoNow() monoTime { return monoTime(time.Since(monoEpoch)) }

// add returns t+d, saturating rather than wrapping round for a huge d.
func (t monoTime) add(d time.Duration) monoTime { return monoTime(memAdd(int64(t), d)) }

// sub returns t-u.
func (t monoTime) sub(u monoTime) time.Duration { return time.Duration(t - u) }

// handlerStart returns when a handler starts, for Event.Duration, or 0
// without an observer: the clock is read only for somebody to tell.
func (s *settings) handlerStart() monoTime {
	if s.observer == nil {
		return 0
	}
	return monoNow()
}

// handlerTook returns how long a handler that started at start ran, or 0
// without an observer.
func (s *settings) handlerTook(start monoTime) time.Duration {
	if s.observer == nil {
		return 0
	}
	return monoNow().sub(start)
}
