package idempotency

import (
	"fmt"
	"net/http"
	"strings"
	"time"
)

// Config configures the middleware returned by [New]. The zero value is
// ready to use: every field's documentation ends with its default. New
// copies what it needs; changing a Config after New has no effect.
type Config struct {
	// HeaderName is the request header that carries the idempotency key.
	// Default "Idempotency-Key".
	HeaderName string

	// TTL is how long a completed response is kept and replayed.
	// Default 24h.
	TTL time.Duration

	// RequireKey makes a covered request without a key fail with 400.
	// Default false: such requests pass through untouched.
	RequireKey bool

	// Methods lists the methods the middleware covers; other methods pass
	// straight through without touching the store. Names are upper-cased.
	// A non-nil empty list panics in New. Default (nil) POST, PUT, PATCH.
	Methods []string

	// Store keeps the records. Default: a [MemoryStore] private to this
	// middleware, which sweeps expired records inline and runs no
	// goroutine.
	Store Store

	// LockTTL is how long an in-flight claim stays valid without renewal.
	// While the handler runs, the middleware renews the claim every
	// LockTTL/3, so a slow handler is never taken over while it is alive,
	// and the claim of a crashed process expires within LockTTL.
	// Default 30s.
	LockTTL time.Duration

	// KeyScope returns the principal (user, tenant, API client) that owns
	// the request's key; keys of different scopes never meet. An API with
	// several users should set it. Default: no scope (one key space).
	KeyScope func(r *http.Request) string

	// FailOpen runs the handler unprotected when the store cannot be
	// reached, instead of answering 503. An unreadable record still fails
	// closed. Default false.
	FailOpen bool

	// WaitForInFlight, when positive, makes a request whose key is in
	// flight wait up to this long (never past its own context) for the
	// first request to finish, and get its replay instead of a 409. If the
	// first request's claim is released (a 5xx, a panic), one waiter claims
	// the key and runs. A [MemoryStore] wakes waiters as soon as the key
	// changes; other stores are polled with backoff. Default 0: answer 409
	// at once.
	WaitForInFlight time.Duration

	// RetryAfter is the Retry-After hint sent with the 409 for a request
	// still in flight (never more than the lease left) and with 503s. It is
	// sent in whole seconds. Default 1s.
	RetryAfter time.Duration

	// StoreTimeout bounds each store call, so a store that hangs turns into
	// a fast 503 rather than a hung request. Default 2s. The calls of a
	// transactional store (TxStore) share deadlines: each gets at least
	// 15/16 of StoreTimeout and never more.
	StoreTimeout time.Duration

	// FingerprintBodyLimit is how many leading bytes of the request body,
	// of those the handler read, the default fingerprint hashes. Bodies
	// that differ only after it are the same request. Default 1 MiB.
	FingerprintBodyLimit int64

	// Fingerprint replaces the default request fingerprint (method, path,
	// query, Content-Type and the part of the body the handler read). It
	// runs before the handler and before a replay, and must not read
	// r.Body. Requests with the same key and different fingerprints get
	// 422. A Fingerprint that returns nil turns the check off: a retry
	// with the same key replays whatever request it carries. Default nil:
	// the built-in fingerprint.
	Fingerprint func(r *http.Request) []byte

	// MaxResponseSize caps the size of a stored response body. A larger
	// response is still delivered in full; its key is completed as "not
	// stored" and retries get a 500 problem response rather than a second
	// execution. Default 1 MiB.
	MaxResponseSize int

	// ShouldStore decides, from the final status, whether a response is
	// stored and replayed. When it returns false the claim is released and
	// a retry runs the handler again. Default [DefaultShouldStore]: every
	// status except 5xx, 408 and 429.
	ShouldStore func(status int) bool

	// NoReplayHeaders lists response headers that are never stored or
	// replayed, in addition to the hop-by-hop headers and Content-Length
	// (always dropped; Content-Length is recomputed on replay). Pass a
	// non-nil empty list to store everything else. Default (nil)
	// [DefaultNoReplayHeaders].
	NoReplayHeaders []string

	// ProblemTypeBase is the prefix of the "type" member of the problem
	// details the middleware writes; each kind of problem appends its own
	// fragment (see [ProblemKeyRequired] and the others). Default
	// "https://github.com/f8e778d0/idempotency#".
	ProblemTypeBase string

	// WriteProblem renders the middleware's own error responses. It must
	// not write internal error text to the client. Default: RFC 9457
	// application/problem+json (see [WriteProblem]).
	WriteProblem func(w http.ResponseWriter, r *http.Request, p *Problem)

	// Observer is told the outcome of every covered request: wire it to
	// logs or metrics. It is called synchronously, so it must be quick and
	// safe for concurrent use. Default nil.
	Observer func(Event)
}

// The defaults of the Config fields, as their documentation states.
const (
	defaultHeaderName           = "Idempotency-Key"
	defaultTTL                  = 24 * time.Hour
	defaultLockTTL              = 30 * time.Second
	defaultRetryAfter           = time.Second
	defaultStoreTimeout         = 2 * time.Second
	defaultFingerprintBodyLimit = 1 << 20
	defaultMaxResponseSize      = 1 << 20
	defaultProblemTypeBase      = "https://github.com/f8e778d0/idempotency#"
)

// DefaultNoReplayHeaders returns the response headers that are not stored
// or replayed by default: Date, Trailer, Set-Cookie, WWW-Authenticate,
// Proxy-Authenticate and Authentication-Info. Cookies and authentication
// challenges belong to the first caller, not to whoever retries.
func DefaultNoReplayHeaders() []string {
	return []string{"Date", "Trailer", "Set-Cookie", "WWW-Authenticate", "Proxy-Authenticate", "Authentication-Info"}
}

// alwaysDropped are dropped from every stored response whatever the
// configuration: the hop-by-hop headers, Trailer (trailers are never
// stored), and Content-Length, which replay recomputes.
var alwaysDropped = [...]string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "Te", "Transfer-Encoding", "Upgrade", "Trailer", "Content-Length"}

// DefaultShouldStore reports whether a response with the given status is
// stored by default: every final status except server errors (5xx), 408
// Request Timeout and 429 Too Many Requests, which are transient and whose
// retry should run again.
func DefaultShouldStore(status int) bool {
	return status < 500 && status != http.StatusRequestTimeout && status != http.StatusTooManyRequests
}

// settings is a validated, normalised Config with everything the request
// path needs precomputed.
type settings struct {
	headerName   string // as configured, for messages
	headerKey    string // canonical form, for Header map look-ups
	ttl          time.Duration
	lockTTL      time.Duration
	requireKey   bool
	methods      []string // nil: the default POST, PUT, PATCH
	store        Store
	tx           TxStore         // store, when its requests run in its transactions
	txDeadline   *sharedDeadline // bounds tx's calls by storeTimeout
	boundedStore bool            // calls can block: bound them by storeTimeout
	keyScope     func(*http.Request) string
	failOpen     bool
	retryAfter   time.Duration
	wait         time.Duration
	storeTimeout time.Duration
	fpLimit      int64
	fingerprint  func(*http.Request) []byte
	maxResponse  int
	shouldStore  func(int) bool
	noReplay     map[string]bool // canonical names
	problemBase  string
	writeProblem func(http.ResponseWriter, *http.Request, *Problem)
	observer     func(Event)

	// The problem details that name the header, built once.
	detailKeyRequired, detailInProgress, detailKeyReused, detailNotCommitted string
}

func newSettings(cfg Config) *settings {
	s := &settings{
		headerName:   cfg.HeaderName,
		ttl:          durationOrDefault("TTL", cfg.TTL, defaultTTL),
		lockTTL:      durationOrDefault("LockTTL", cfg.LockTTL, defaultLockTTL),
		requireKey:   cfg.RequireKey,
		store:        cfg.Store,
		keyScope:     cfg.KeyScope,
		failOpen:     cfg.FailOpen,
		retryAfter:   durationOrDefault("RetryAfter", cfg.RetryAfter, defaultRetryAfter),
		wait:         cfg.WaitForInFlight,
		storeTimeout: durationOrDefault("StoreTimeout", cfg.StoreTimeout, defaultStoreTimeout),
		fpLimit:      cfg.FingerprintBodyLimit,
		fingerprint:  cfg.Fingerprint,
		maxResponse:  cfg.MaxResponseSize,
		shouldStore:  cfg.ShouldStore,
		problemBase:  cfg.ProblemTypeBase,
		writeProblem: cfg.WriteProblem,
		observer:     cfg.Observer,
	}
	if s.headerName == "" {
		s.headerName = defaultHeaderName
	}
	if !isToken(s.headerName) {
		panic(fmt.Sprintf("idempotency: HeaderName %q is not a valid header field name", s.headerName))
	}
	s.headerKey = http.CanonicalHeaderKey(s.headerName)
	if s.wait < 0 {
		panic("idempotency: WaitForInFlight must not be negative")
	}
	switch {
	case s.fpLimit < 0:
		panic("idempotency: FingerprintBodyLimit must not be negative")
	case s.fpLimit == 0:
		s.fpLimit = defaultFingerprintBodyLimit
	}
	switch {
	case s.maxResponse < 0:
		panic("idempotency: MaxResponseSize must not be negative")
	case s.maxResponse == 0:
		s.maxResponse = defaultMaxResponseSize
	}
	if cfg.Methods != nil {
		if len(cfg.Methods) == 0 {
			panic("idempotency: Methods is empty; use nil for the default POST, PUT, PATCH")
		}
		for _, m := range cfg.Methods {
			m = strings.ToUpper(strings.TrimSpace(m))
			if !isToken(m) {
				panic(fmt.Sprintf("idempotency: Methods holds an invalid method %q", m))
			}
			s.methods = append(s.methods, m)
		}
	}
	if s.store == nil {
		s.store = NewMemoryStore()
	}
	// The memory store never blocks: a deadline on its calls would only
	// cost allocations. Any other store may wait on a network.
	_, inMemory := s.store.(*MemoryStore)
	s.boundedStore = !inMemory
	if rs, ok := s.store.(*RedisStore); ok {
		rs.checkStoreTimeout(s.storeTimeout)
	}
	if ts, ok := s.store.(TxStore); ok && ts.Transactional() {
		if s.failOpen {
			panic("idempotency: FailOpen cannot be used with a transactional store: there would be no transaction for the handler")
		}
		s.tx = ts
		s.txDeadline = &sharedDeadline{timeout: s.storeTimeout}
	}
	if s.shouldStore == nil {
		s.shouldStore = DefaultShouldStore
	}
	noReplay := cfg.NoReplayHeaders
	if noReplay == nil {
		noReplay = DefaultNoReplayHeaders()
	}
	s.noReplay = make(map[string]bool, len(noReplay)+len(alwaysDropped))
	for _, h := range alwaysDropped {
		s.noReplay[h] = true
	}
	for _, h := range noReplay {
		s.noReplay[http.CanonicalHeaderKey(h)] = true
	}
	if s.problemBase == "" {
		s.problemBase = defaultProblemTypeBase
	}
	s.detailKeyRequired = s.headerName + " header is required"
	s.detailInProgress = "A request with this " + s.headerName + " is already in progress"
	s.detailKeyReused = "This " + s.headerName + " was already used for a different request"
	s.detailNotCommitted = "The request was not committed, or may not have been; a retry with the same " + s.headerName + " is safe"
	if s.writeProblem == nil {
		s.writeProblem = WriteProblem
	}
	return s
}

func durationOrDefault(name string, d, def time.Duration) time.Duration {
	switch {
	case d < 0:
		panic("idempotency: " + name + " must not be negative")
	case d == 0:
		return def
	}
	return d
}

// covers reports whether the middleware handles requests with method.
func (s *settings) covers(method string) bool {
	if s.methods == nil {
		return method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch
	}
	for _, m := range s.methods {
		if m == method {
			return true
		}
	}
	return false
}

// isToken reports whether v is an RFC 9110 token, the syntax of header
// field names and methods.
func isToken(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// replayed reports whether a stored response keeps the header field name
// (canonical): it is not one that is never replayed.
func (s *settings) replayed(name string) bool { return !s.noReplay[name] }
