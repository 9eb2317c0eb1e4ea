package idempotency

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
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
	return func(next http.Handler) http.Handler {
		if next == nil {
			panic("idempotency: nil handler")
		}
		return &handler{s: s, tokens: tokens, next: next}
	}
}

type handler struct {
	s      *settings
	tokens *tokenSource
	next   http.Handler
}

// ServeHTTP is the request lifecycle: key, claim, then replay, conflict or
// run, and complete or release.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s := h.s
	if !s.covers(r.Method) || claimedByOuter(r.Context()) {
		// A request an outer instance holds the claim for is its to
		// settle: a second claim here would answer it 409.
		h.next.ServeHTTP(w, r)
		return
	}

	// 1. The key.
	values := r.Header[s.headerKey]
	if len(values) == 0 {
		if !s.requireKey {
			s.observe(Event{Outcome: OutcomeKeyMissing, Request: r})
			h.next.ServeHTTP(w, r)
			return
		}
		s.observe(Event{Outcome: OutcomeKeyMissing, Request: r, Status: http.StatusBadRequest})
		s.writeProblem(w, r, s.problem(ProblemKeyRequired, http.StatusBadRequest, s.detailKeyRequired))
		return
	}
	key, err := parseKey(s.headerName, values)
	if err != nil {
		detail := err.Error()
		s.observe(Event{Outcome: OutcomeKeyInvalid, Request: r, Status: http.StatusBadRequest, Detail: detail})
		s.writeProblem(w, r, s.problem(ProblemKeyInvalid, http.StatusBadRequest, detail))
		return
	}

	// 2. The storage key, from scope and key, and this request's token.
	var scope string
	if s.keyScope != nil {
		scope = s.keyScope(r)
	}
	skey, token := h.keyAndToken(scope, key)
	if s.tx != nil {
		h.serveTx(w, r, s.tx, skey, key)
		return
	}

	// 3. Claim the key, or get the record that is there, in one operation.
	ctx, cancel := s.storeContext(r.Context())
	rec, err := s.store.Claim(ctx, skey, token, s.lockTTL)
	cancel()
	claimedAt := time.Now()
	if err == nil && rec != nil && rec.State == StateInFlight && s.wait > 0 {
		rec, claimedAt, err = s.awaitInFlight(r.Context(), skey, token, rec)
	}

	if err == nil && rec != nil {
		err = checkRecord(rec)
	}
	switch {
	case err != nil:
		h.claimFailed(w, r, skey, key, err)
	case rec == nil:
		h.run(w, r, skey, key, token, claimedAt)
	case rec.State == StateCompleted:
		s.replay(w, r, skey, rec)
	default:
		s.conflict(w, r, skey, rec)
	}
}

// checkRecord returns an error wrapping ErrCorruptRecord when a store
// returned a record that cannot be answered from, so that the request fails
// closed rather than replaying nonsense or running twice.
func checkRecord(rec *Record) error {
	switch {
	case rec.State == StateInFlight:
		return nil
	case rec.State != StateCompleted:
		return fmt.Errorf("%w: state %d", ErrCorruptRecord, rec.State)
	case rec.Response.StatusCode < 200 && !(rec.Response.StatusCode == http.StatusSwitchingProtocols && rec.Response.NotStored != ""),
		rec.Response.StatusCode > 999:
		return fmt.Errorf("%w: status %d", ErrCorruptRecord, rec.Response.StatusCode)
	}
	return nil
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
	// An unreadable record means the key was used, and a claim too few
	// replicas acknowledged reached a master: fail closed whatever
	// FailOpen says.
	if s.failOpen && !errors.Is(err, ErrCorruptRecord) && !errors.Is(err, ErrReplicaAcks) && r.Context().Err() == nil {
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
func (s *settings) replay(w http.ResponseWriter, r *http.Request, skey string, rec *Record) {
	if !s.matches(w, r, rec.Fingerprint) {
		s.observe(Event{Outcome: OutcomeMismatch, Request: r, StorageKey: skey, Status: http.StatusUnprocessableEntity})
		s.writeProblem(w, r, s.problem(ProblemKeyReused, http.StatusUnprocessableEntity, s.detailKeyReused))
		return
	}
	s.answerFrom(w, r, skey, rec)
}

// answerFrom answers a request from the completed record of its key: the
// stored response, or the not-stored problem.
func (s *settings) answerFrom(w http.ResponseWriter, r *http.Request, skey string, rec *Record) {
	resp := &rec.Response
	if resp.NotStored != "" {
		s.observe(Event{Outcome: OutcomeNotStoredReplay, Request: r, StorageKey: skey, Status: http.StatusInternalServerError, Detail: resp.NotStored})
		p := s.problem(ProblemNotStored, http.StatusInternalServerError,
			"The original response was not stored ("+resp.NotStored+") and cannot be replayed")
		p.OriginalStatus = resp.StatusCode
		p.Location = resp.Header.Get("Location")
		s.writeProblem(w, r, p)
		return
	}
	s.observe(Event{Outcome: OutcomeReplayed, Request: r, StorageKey: skey, Status: resp.StatusCode})
	writeStored(w, resp)
}

// matches reports whether r is the request that stored the fingerprint
// want. An empty want, or a custom Fingerprint that returns nil, checks
// nothing.
func (s *settings) matches(w http.ResponseWriter, r *http.Request, want []byte) bool {
	if len(want) == 0 {
		return true
	}
	if s.fingerprint != nil {
		got := s.fingerprint(r)
		return got == nil || bytes.Equal(got, want)
	}
	return matchFingerprint(w, r, want, s.fpLimit, s.storeTimeout)
}

// writeStored writes a stored response, marked as replayed.
func writeStored(w http.ResponseWriter, resp *Response) { writeResponse(w, resp, true) }

// writeResponse writes resp, with an exact Content-Length and, when
// replayed, the replay marker. The header values are copied into one new
// backing array, so the writer never holds a slice of resp.
func writeResponse(w http.ResponseWriter, resp *Response, replayed bool) {
	h := w.Header()
	n := 2
	for _, values := range resp.Header {
		n += len(values)
	}
	vals := make([]string, 0, n)
	add := func(name string, values ...string) {
		i := len(vals)
		vals = append(vals, values...)
		h[name] = vals[i:len(vals):len(vals)]
	}
	for name, values := range resp.Header {
		add(name, values...)
	}
	allowed := bodyAllowed(resp.StatusCode)
	if allowed {
		add("Content-Length", strconv.Itoa(len(resp.Body)))
	} else {
		delete(h, "Content-Length")
	}
	if replayed {
		add(ReplayedHeader, "true")
	}
	w.WriteHeader(resp.StatusCode)
	if allowed && len(resp.Body) > 0 {
		_, _ = w.Write(resp.Body)
	}
}

// bodyAllowed reports whether a final response with status may carry a body.
func bodyAllowed(status int) bool {
	return status >= 200 && status != http.StatusNoContent && status != http.StatusNotModified
}

// storeContext returns the context for one store call on the request path,
// bounded by StoreTimeout for a store that can block.
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

// keyAndToken returns the storage key of key under scope and a new owner
// token, in one allocation: a store that keeps the claim keeps both.
func (h *handler) keyAndToken(scope, key string) (skey, token string) {
	var buf [2*sha256.Size + tokenLen]byte
	both := string(h.tokens.append(appendStorageKey(buf[:0], scope, key)))
	return both[:2*sha256.Size], both[2*sha256.Size:]
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
