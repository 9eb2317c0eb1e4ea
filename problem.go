package idempotency

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// Fragments appended to Config.ProblemTypeBase to form the "type" of each
// problem the middleware writes. They are stable: clients may compare the
// type to tell the middleware's own responses from the handler's.
const (
	ProblemKeyRequired      = "key-required"        // 400: the key header is missing and required
	ProblemKeyInvalid       = "key-invalid"         // 400: the key header is malformed
	ProblemInProgress       = "request-in-progress" // 409: the same key is still being processed
	ProblemKeyReused        = "key-reused"          // 422: the key was used for a different request
	ProblemStoreUnavailable = "store-unavailable"   // 503: the store cannot be reached or read
	ProblemStoreFull        = "store-full"          // 503: the memory store is at its entry or byte cap
	ProblemNotStored        = "response-not-stored" // 500: the original response was not kept
	ProblemNotCommitted     = "not-committed"       // 503 (or 500): a transactional store did not commit the request
)

// Problem is an RFC 9457 problem detail produced by the middleware.
type Problem struct {
	// Type is the problem type URI: Config.ProblemTypeBase followed by one
	// of the Problem* fragments.
	Type string `json:"type"`
	// Title is a short summary of the problem type.
	Title string `json:"title"`
	// Status is the HTTP status code.
	Status int `json:"status"`
	// Detail explains this occurrence. It never holds internal error text.
	Detail string `json:"detail"`
	// OriginalStatus is, for ProblemNotStored, the status of the original
	// response; zero otherwise.
	OriginalStatus int `json:"original_status,omitempty"`
	// Location is, for ProblemNotStored, the Location header of the
	// original response, if it had one.
	Location string `json:"location,omitempty"`

	// RetryAfter, when positive, is sent as the Retry-After header, in
	// whole seconds.
	RetryAfter time.Duration `json:"-"`
	// Err is the internal error behind the problem, for logging by a custom
	// WriteProblem. It is never rendered.
	Err error `json:"-"`
}

// WriteProblem writes p as application/problem+json with Cache-Control:
// no-store and, when p.RetryAfter is set, Retry-After. It is the default
// Config.WriteProblem; a custom renderer may call it.
func WriteProblem(w http.ResponseWriter, _ *http.Request, p *Problem) {
	body, err := json.Marshal(p)
	if err != nil { // cannot happen: every field marshals
		body = []byte(`{"status":` + strconv.Itoa(p.Status) + `}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/problem+json")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if p.RetryAfter > 0 || p.Status == http.StatusConflict {
		h.Set("Retry-After", strconv.FormatInt(int64(p.RetryAfter/time.Second), 10))
	}
	w.WriteHeader(p.Status)
	_, _ = w.Write(body)
}

// problem builds the Problem for one of the fragments above.
func (s *settings) problem(fragment string, status int, detail string) *Problem {
	return &Problem{
		Type:   s.problemBase + fragment,
		Title:  problemTitle(fragment),
		Status: status,
		Detail: detail,
	}
}

// problemTitle returns the fixed title of a problem type.
func problemTitle(fragment string) string {
	switch fragment {
	case ProblemKeyRequired:
		return "Idempotency key required"
	case ProblemKeyInvalid:
		return "Invalid idempotency key"
	case ProblemInProgress:
		return "Request in progress"
	case ProblemKeyReused:
		return "Idempotency key reused"
	case ProblemStoreUnavailable:
		return "Idempotency store unavailable"
	case ProblemStoreFull:
		return "Idempotency store full"
	case ProblemNotStored:
		return "Response not stored"
	case ProblemNotCommitted:
		return "Request not committed"
	}
	return "Idempotency error"
}
