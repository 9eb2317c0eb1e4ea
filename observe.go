package idempotency

import (
	"net/http"
	"time"
)

// Outcome is what the middleware did with a covered request.
type Outcome uint8

// The outcomes reported to Config.Observer.
const (
	// OutcomeExecuted: the handler ran and its response was stored.
	OutcomeExecuted Outcome = iota + 1
	// OutcomeReleased: the handler ran but its response is not kept (a
	// status ShouldStore refused, a panic, a request body that failed
	// before a non-success answer, a lost lease): the claim was released
	// so a retry runs again. Event.Detail says which, when it is not the
	// status.
	OutcomeReleased
	// OutcomeReplayed: a stored response was replayed.
	OutcomeReplayed
	// OutcomeConflict: the key was in flight; the request got 409.
	OutcomeConflict
	// OutcomeMismatch: the key was used for a different request; 422.
	OutcomeMismatch
	// OutcomeKeyMissing: a covered request had no key (passed through, or
	// 400 when the key is required).
	OutcomeKeyMissing
	// OutcomeKeyInvalid: the key header was malformed; 400.
	OutcomeKeyInvalid
	// OutcomeStoreError: a store call failed. Event.Err says how; the
	// request got 503, ran unprotected under FailOpen, or (a renewal or a
	// completion) the call is retried while the lease lasts. A completion
	// retried after the response went out is reported from another
	// goroutine, after the request's handler returned.
	OutcomeStoreError
	// OutcomeStoreFull: the store refused a new key for capacity; 503.
	OutcomeStoreFull
	// OutcomeLeaseLost: the request's claim expired and may have been
	// taken over; its context was cancelled and its response not stored.
	OutcomeLeaseLost
	// OutcomeNotStored: the response was delivered but cannot be
	// replayed; retries get a 500 problem. Event.Detail says why: "too
	// large", "hijacked", "incomplete" (shorter than its Content-Length),
	// "store_full" (the memory store's byte budget), or "store
	// unavailable" (the completion was given up with the lease, so a retry
	// may run the handler again).
	OutcomeNotStored
	// OutcomeNotStoredReplay: a retry of a request whose response was not
	// stored got the 500 problem.
	OutcomeNotStoredReplay
	// OutcomeNotCommitted: with a transactional store ([TxStore]), the
	// commit of the handler's writes and its response failed or its
	// outcome is unknown; the request got 503. Event.Err says why.
	OutcomeNotCommitted
)

// String returns the outcome's name in lower case, such as "replayed".
func (o Outcome) String() string {
	switch o {
	case OutcomeExecuted:
		return "executed"
	case OutcomeReleased:
		return "released"
	case OutcomeReplayed:
		return "replayed"
	case OutcomeConflict:
		return "conflict"
	case OutcomeMismatch:
		return "mismatch"
	case OutcomeKeyMissing:
		return "key_missing"
	case OutcomeKeyInvalid:
		return "key_invalid"
	case OutcomeStoreError:
		return "store_error"
	case OutcomeStoreFull:
		return "store_full"
	case OutcomeLeaseLost:
		return "lease_lost"
	case OutcomeNotStored:
		return "not_stored"
	case OutcomeNotStoredReplay:
		return "not_stored_replay"
	case OutcomeNotCommitted:
		return "not_committed"
	}
	return "unknown"
}

// Event describes one outcome for Config.Observer. None of its own fields
// holds the client's key in clear; Request's header does, so an observer
// that logs requests must leave the key header out.
type Event struct {
	// Outcome is what happened.
	Outcome Outcome
	// Request is the request concerned. Observers must not read its body.
	Request *http.Request
	// StorageKey is the hashed key the record is stored under (see
	// [StorageKey]); empty when the request had no valid key. Safe to log.
	StorageKey string
	// Status is the status sent to the client, when known.
	Status int
	// Err is the error behind OutcomeStoreError, OutcomeStoreFull and
	// OutcomeLeaseLost.
	Err error
	// Detail gives the reason for OutcomeKeyInvalid and OutcomeNotStored.
	Detail string
	// Duration is how long the handler ran, for OutcomeExecuted,
	// OutcomeReleased and OutcomeNotStored.
	Duration time.Duration
}

func (s *settings) observe(e Event) {
	if s.observer != nil {
		s.observer(e)
	}
}
