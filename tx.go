package idempotency

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"time"
)

// Errors of a [TxStore].
var (
	// ErrKeyBusy is returned by TxStore.Begin when another request's
	// transaction holds the key: the request gets 409.
	ErrKeyBusy = errors.New("idempotency: key is held by another transaction")

	// ErrNotCommitted is wrapped by StoreTx.Commit when the transaction
	// did not commit, or may not have: COMMIT failed or got no answer, or
	// the database gave up on it (a serialisation failure, a deadlock).
	// The request gets 503: its retry with the same key either finds the
	// committed record or runs afresh.
	ErrNotCommitted = errors.New("idempotency: transaction not committed")
)

// TxStore is the optional interface of a [Store] that can run each covered
// request in a database transaction of its own, so that the handler's
// writes and the stored response commit together or not at all: the
// one-transaction mode of the postgres package. When Transactional reports
// true, the middleware takes this second path through its lifecycle
// instead of the lease: Begin instead of Claim, and StoreTx.Commit or
// StoreTx.Rollback instead of Complete or Release. Extend is not used.
//
// On this path the response is held in memory until the commit succeeded
// (Flush does nothing, Hijack reports [http.ErrNotSupported]); a response
// larger than Config.MaxResponseSize, or shorter than its Content-Length,
// rolls back and is answered 500; a status of 500 or more, one ShouldStore
// refuses, and a panic roll back. Config.FailOpen makes New panic: there
// would be no transaction to give the handler.
type TxStore interface {
	Store

	// Transactional reports whether the store runs requests in its
	// transactions (true) or under a lease like any Store (false).
	Transactional() bool

	// Begin starts a transaction for the request whose storage key is
	// key, takes the key in it (a lock that ends with the transaction, so
	// that a crashed process frees it at once), then looks for the key's
	// completed record. It returns the transaction and nil when the
	// handler should run in it; the transaction and the live completed
	// record when the request is answered from that record (the
	// middleware rolls the transaction back after answering);
	// [ErrKeyBusy] when another transaction holds the key, with the
	// transaction, if one was begun, for the middleware to roll back after
	// answering 409; any other error when the store cannot serve the
	// request (503), with a transaction to roll back if one was begun.
	// ctx bounds the call (Config.StoreTimeout).
	Begin(ctx context.Context, key string) (StoreTx, *Record, error)
}

// StoreTx is a request's transaction in a [TxStore].
type StoreTx interface {
	// Context returns ctx carrying the transaction, for the handler.
	Context(ctx context.Context) context.Context

	// Aborted reports whether a statement in the transaction failed, so
	// that it can only roll back.
	Aborted() bool

	// Commit stores rec under the key for ttl and commits the
	// transaction. It returns (nil, nil) once committed; a live record
	// and nil, having rolled back, when another request completed the key
	// first; an error wrapping [ErrNotCommitted] when the transaction did
	// not commit or may not have, and any other error when it certainly
	// did not.
	Commit(ctx context.Context, rec *Record, ttl time.Duration) (*Record, error)

	// Rollback ends the transaction if it has not ended and gives its
	// connection back. It is safe to call after Commit.
	Rollback(ctx context.Context) error
}

// serveTx is the lifecycle of a covered request with a valid key on a
// transactional store: begin and take the key, then replay, conflict or
// run, and commit or roll back.
func (h *handler) serveTx(w http.ResponseWriter, r *http.Request, ts TxStore, skey, key string) {
	s := h.s
	ctx, cancel := s.beginContext(r.Context())
	tx, rec, err := ts.Begin(ctx, skey)
	cancel()
	if errors.Is(err, ErrKeyBusy) && s.wait > 0 {
		s.rollback(r, tx)
		tx, rec, err = s.awaitTx(r, ts, skey)
	}
	if err == nil && rec != nil {
		err = checkRecord(rec)
	}
	if err != nil || rec != nil {
		// The answer goes out first, then the rollback, even when an
		// observer panics.
		defer s.rollbackAfter(w, r, tx)
	}
	switch {
	case errors.Is(err, ErrKeyBusy):
		s.conflict(w, r, skey, &Record{})
	case err != nil:
		h.claimFailed(w, r, skey, key, err)
	case rec != nil:
		s.replay(w, r, skey, rec)
	default:
		h.runTx(w, r, tx, skey, key)
	}
}

// beginContext returns the context of a Begin: bounded by StoreTimeout
// (the shared deadline of deadline.go), and cancelled when the client
// hangs up, so that a request whose client left while it waited for a
// connection gives its place up rather than running for nobody.
func (s *settings) beginContext(request context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := s.txDeadline.context(request)
	stop := context.AfterFunc(request, cancel)
	return ctx, func() {
		stop()
		cancel()
	}
}

// rollbackAfter sends what was written to w, so that the client does not
// wait for the rollback, then rolls tx back.
func (s *settings) rollbackAfter(w http.ResponseWriter, r *http.Request, tx StoreTx) {
	if tx == nil {
		return
	}
	_ = http.NewResponseController(w).Flush()
	s.rollback(r, tx)
}

// awaitTx polls Begin with backoff while the key is busy, for at most
// Config.WaitForInFlight and never past the request's end. Each attempt
// takes a connection anew and a busy one is rolled back at once: a waiting
// request holds none.
func (s *settings) awaitTx(r *http.Request, ts TxStore, skey string) (StoreTx, *Record, error) {
	ctx := r.Context()
	deadline := time.Now().Add(s.wait)
	poll := waitFirstPoll
	for {
		wait := min(poll, time.Until(deadline))
		if wait <= 0 {
			return nil, nil, ErrKeyBusy
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, nil, ErrKeyBusy
		}
		poll = min(2*poll, waitMaxPoll)
		cctx, cancel := s.beginContext(ctx)
		tx, rec, err := ts.Begin(cctx, skey)
		cancel()
		if !errors.Is(err, ErrKeyBusy) {
			return tx, rec, err
		}
		s.rollback(r, tx)
	}
}

// runTx runs the handler in tx with its response held back, then commits
// the response with the handler's writes, or rolls both back.
func (h *handler) runTx(w http.ResponseWriter, r *http.Request, tx StoreTx, skey, key string) {
	s := h.s
	f := &flight{s: s, r: r, skey: skey}
	f.ctx = keyContext{Context: tx.Context(r.Context()), key: key, claimed: true}
	r2 := r.WithContext(&f.ctx)
	f.rec = recorder{w: &heldResponse{header: http.Header{}}, maxBody: s.maxResponse, declLen: -1, flushed: -1}
	start := time.Now()
	normal := false
	defer func() {
		if !normal {
			// A panic or runtime.Goexit: roll back, without recovering.
			s.rollback(r, tx)
			s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: skey, Duration: time.Since(start), Detail: "handler panicked"})
		}
	}()
	f.watchBody(r2)
	h.next.ServeHTTP(&f.rec, r2)
	normal = true
	f.sealFingerprint()
	took := time.Since(start)

	rec := &f.rec
	status := rec.status()
	rollback := func(detail string) {
		s.rollback(r, tx)
		s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: skey, Status: status, Duration: took, Detail: detail})
	}
	// f.record filters the header it stores in place: the first client
	// gets all of it.
	held := Response{StatusCode: status, Header: rec.header().Clone(), Body: rec.buf}
	switch {
	case tx.Aborted():
		// A statement failed and the handler went on: its writes are gone,
		// so a success it reports would be false.
		rollback("transaction aborted")
		if status < 400 {
			s.writeProblem(w, r, s.problem(ProblemNotCommitted, http.StatusInternalServerError,
				"A database statement of this request failed; nothing was committed"))
			return
		}
		writeResponse(w, &held, false)
	case f.body.failed && (status < 200 || status >= 400), status >= 500, !s.shouldStore(status):
		rollback("")
		writeResponse(w, &held, false)
	case rec.over, rec.incomplete() && r.Method != http.MethodHead:
		rollback("response not storable")
		s.writeProblem(w, r, s.problem(ProblemNotCommitted, http.StatusInternalServerError,
			"The response could not be stored; nothing was committed"))
	default:
		ctx, cancel := s.txDeadline.context(r.Context())
		live, err := tx.Commit(ctx, f.record(status), s.ttl)
		cancel()
		switch {
		case err != nil:
			s.rollback(r, tx)
			s.observe(Event{Outcome: OutcomeNotCommitted, Request: r, StorageKey: skey, Status: http.StatusServiceUnavailable, Duration: took, Err: err})
			p := s.problem(ProblemNotCommitted, http.StatusServiceUnavailable, s.detailNotCommitted)
			p.RetryAfter, p.Err = s.retryAfter, err
			s.writeProblem(w, r, p)
		case live != nil:
			// Another request completed the key first, under a snapshot
			// that hid it from Begin: everything was rolled back.
			s.observe(Event{Outcome: OutcomeReleased, Request: r, StorageKey: skey, Status: status, Duration: took, Detail: "completed by another request"})
			if err := checkRecord(live); err != nil {
				h.claimFailed(w, r, skey, key, err)
				return
			}
			if live.State == StateInFlight {
				// A store under a lease on the same table claimed the key.
				s.conflict(w, r, skey, live)
				return
			}
			if !s.fingerprintsMatch(f.fingerprint, live.Fingerprint) {
				s.observe(Event{Outcome: OutcomeMismatch, Request: r, StorageKey: skey, Status: http.StatusUnprocessableEntity})
				s.writeProblem(w, r, s.problem(ProblemKeyReused, http.StatusUnprocessableEntity, s.detailKeyReused))
				return
			}
			s.answerFrom(w, r, skey, live)
		default:
			s.observe(Event{Outcome: OutcomeExecuted, Request: r, StorageKey: skey, Status: status, Duration: took, Detail: "committed"})
			writeResponse(w, &held, false)
		}
	}
}

// fingerprintsMatch compares the fingerprint of a request that ran with
// the one a record holds. A custom Fingerprint that returned nil, or a
// record without one, checks nothing.
func (s *settings) fingerprintsMatch(got, want []byte) bool {
	return len(got) == 0 || len(want) == 0 || bytes.Equal(got, want)
}

// rollback rolls tx back, if there is one, on a context that outlives
// the request.
func (s *settings) rollback(r *http.Request, tx StoreTx) {
	if tx == nil {
		return
	}
	ctx, cancel := s.txDeadline.context(r.Context())
	defer cancel()
	if err := tx.Rollback(ctx); err != nil {
		s.observe(Event{Outcome: OutcomeStoreError, Request: r, Err: err, Detail: "rollback failed"})
	}
}

// heldResponse is the writer under a transactional request's recorder: it
// sends nothing, so the response is held until the commit. Its Flush does
// nothing; it cannot hijack.
type heldResponse struct{ header http.Header }

func (h *heldResponse) Header() http.Header         { return h.header }
func (h *heldResponse) Write(p []byte) (int, error) { return len(p), nil }
func (h *heldResponse) WriteHeader(int)             {}
func (h *heldResponse) FlushError() error           { return nil }
