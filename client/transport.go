// Package client is the client half of idempotency: an [http.RoundTripper]
// that gives every POST, PUT and PATCH an Idempotency-Key and retries it
// when retrying is safe.
//
// # Usage
//
//	c := &http.Client{Transport: &client.Transport{}}
//	resp, err := c.Post(url, "application/json", strings.NewReader(body))
//
// For a covered request without a key, [Transport] generates one (a random
// UUIDv4, see [NewKey]) and sends the same key on every attempt, so a server
// running the idempotency middleware executes the request at most once and
// answers the retries with the stored response. A key the caller set is
// kept as it is.
//
// # What is retried
//
// A request is sent again, up to MaxAttempts in all, after:
//
//   - a network error (the request may or may not have reached the server;
//     the key makes the retry safe either way), the transport's own
//     timeouts included: a dial timeout, [http.Transport]'s
//     ResponseHeaderTimeout or TLSHandshakeTimeout. A handler slower than
//     ResponseHeaderTimeout is still running when the retry arrives; the
//     retry gets the middleware's 409 and waits, and a later one gets the
//     stored response, so the handler runs once;
//   - the middleware's own 409 Conflict, "a request with this key is in
//     progress", recognised by the type of its problem details (never a 409
//     that the handler wrote);
//   - 502 Bad Gateway, 503 Service Unavailable and 504 Gateway Timeout.
//
// Every other response, notably 400, 422 and 500, is returned at once: a
// 500 was produced by the handler and a retry would run it again.
//
// Only the caller's own context ending (its cancellation, its deadline,
// [http.Client.Timeout]) is final: a request whose context is done is not
// sent again, and the waits between attempts end with the context. A
// request whose body cannot be replayed (a non-empty Body with a nil
// GetBody; [http.NewRequest] sets GetBody for the usual readers) is sent
// once and never retried.
//
// # Giving up
//
// When the transport returns no response, its error is an [*Error] that
// carries the key every attempt was sent with (http.Client wraps it in a
// [*net/url.Error]; find it with [errors.As]). The request may have run on the
// server. An application that retries it later, from a queue or after a
// restart, sends it with the same key and gets the stored response
// instead of a second execution. The one exception is [http.Client.Timeout]:
// net/http then replaces the transport's error with its own, so the key is
// lost; give the request a context deadline instead, which has the same
// effect, or set the key yourself (see [NewKey]).
//
// # Waiting
//
// Between attempts the transport waits a random duration between zero and
// BaseDelay·2ⁿ, capped at MaxDelay ("full jitter"), so that many clients
// retrying together spread out. A Retry-After header on the response sets
// the least wait. When the server asks for a longer wait than MaxDelay,
// or the wait would end after the context's deadline, the transport stops
// and returns the response it has rather than wait in vain. To bound the
// whole exchange, attempts and waits together, give the request a context
// deadline or set [http.Client.Timeout], which the transport sees as one.
//
// The package depends on the standard library only; it does not import the
// middleware package.
package client

import (
	"bytes"
	"context"
	cryptorand "crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Defaults used when the corresponding Transport field is zero. The header
// name and problem type base are those of the middleware's defaults.
const (
	DefaultHeaderName      = "Idempotency-Key"
	DefaultMaxAttempts     = 4
	DefaultBaseDelay       = 250 * time.Millisecond
	DefaultMaxDelay        = 10 * time.Second
	DefaultProblemTypeBase = "https://github.com/f8e778d0/idempotency#"
)

// ProblemInProgress is the fragment that, appended to ProblemTypeBase,
// forms the problem type of the middleware's 409 for a key still in flight.
const ProblemInProgress = "request-in-progress"

// problemPeekLimit bounds how much of a 409 body is read to find its
// problem type. The middleware's own problem is a few hundred bytes; a
// larger body is not the middleware's.
const problemPeekLimit = 4 << 10

// drainLimit bounds how much of a discarded response body is read so that
// its connection can be reused.
const drainLimit = 64 << 10

// Transport is an [http.RoundTripper] that sends an idempotency key with
// every covered request and retries the request, with the same key, when a
// retry is safe and may succeed (see the package documentation).
//
// The zero Transport is ready to use: every field's documentation ends with
// its default. A Transport is safe for concurrent use by multiple
// goroutines; do not change its fields once it is in use.
type Transport struct {
	// Base sends each attempt. Default [http.DefaultTransport].
	Base http.RoundTripper

	// HeaderName is the request header that carries the key. It must match
	// the server's Config.HeaderName. Default "Idempotency-Key".
	HeaderName string

	// Methods lists the methods that get a key and retries; requests with
	// other methods go to Base untouched. Default (nil) POST, PUT, PATCH.
	Methods []string

	// MaxAttempts is the most times one request is sent, the first
	// included. 1 turns retries off (keys are still added). Default 4.
	MaxAttempts int

	// BaseDelay is the backoff before the first retry; it doubles with
	// each attempt, and the actual wait is drawn at random below it.
	// Default 250ms.
	BaseDelay time.Duration

	// MaxDelay caps each wait: the backoff never exceeds it, and a
	// response whose Retry-After asks for more is returned to the caller
	// instead of retried. Default 10s.
	MaxDelay time.Duration

	// ProblemTypeBase is the server's Config.ProblemTypeBase: the 409 whose
	// problem type is ProblemTypeBase + [ProblemInProgress] is retried.
	// Default "https://github.com/f8e778d0/idempotency#".
	ProblemTypeBase string

	// sleep waits d or until ctx is done; tests replace it. Default
	// sleepContext.
	sleep func(ctx context.Context, d time.Duration) error
	// jitter draws the wait below the backoff ceiling; tests replace it.
	// Default a uniform draw in [0, ceiling].
	jitter func(ceiling time.Duration) time.Duration
}

var _ http.RoundTripper = (*Transport)(nil)

// RoundTrip sends req, and sends it again while the outcome is retryable
// and attempts, context and body allow. It returns the last response or
// error. req is not modified: each attempt sends a clone that carries the
// key.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !t.covers(req.Method) {
		return t.base().RoundTrip(req)
	}
	header := t.HeaderName
	if header == "" {
		header = DefaultHeaderName
	}
	key := req.Header.Get(header)
	if key == "" {
		key = NewKey()
	}
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	maxAttempts := t.MaxAttempts
	if maxAttempts <= 0 {
		maxAttempts = DefaultMaxAttempts
	}
	if !replayable {
		maxAttempts = 1
	}
	ctx := req.Context()

	for attempt := 1; ; attempt++ {
		try := req.Clone(ctx)
		try.Header.Set(header, key)
		if attempt > 1 && req.GetBody != nil {
			body, err := req.GetBody()
			if err != nil {
				return nil, &Error{Key: key, Attempts: attempt - 1, Err: fmt.Errorf("replaying the request body: %w", err)}
			}
			try.Body = body
		}

		resp, err := t.base().RoundTrip(try)
		if err != nil {
			err = &Error{Key: key, Attempts: attempt, Err: err}
		}
		if attempt >= maxAttempts || !t.retryable(ctx, resp, err) {
			return resp, err
		}
		wait, ok := t.wait(ctx, attempt, resp)
		if !ok {
			return resp, err
		}
		if resp != nil {
			discard(resp.Body)
		}
		if serr := t.sleepFunc()(ctx, wait); serr != nil {
			return nil, &Error{Key: key, Attempts: attempt, Err: fmt.Errorf("retry abandoned: %w", serr)}
		}
	}
}

// Error is the error [Transport.RoundTrip] returns for a covered request
// that got no response: every attempt failed, the caller's context ended,
// or the body could not be sent again. The request may have run on the
// server; Key is what lets the application find out safely, by sending it
// again later with the same key.
type Error struct {
	// Key is the idempotency key that every attempt carried: the caller's
	// own, or the one the transport generated.
	Key string
	// Attempts is how many attempts were sent.
	Attempts int
	// Err is the last attempt's error, or why no further attempt was made.
	Err error
}

// Error returns the cause with the number of attempts. It leaves the key
// out, since error text tends to end up in logs.
func (e *Error) Error() string {
	return fmt.Sprintf("client: no response after %d attempt(s): %v", e.Attempts, e.Err)
}

// Unwrap returns the cause, so errors.Is sees context.Canceled and the
// others through it.
func (e *Error) Unwrap() error { return e.Err }

// CloseIdleConnections closes the idle connections of Base, when Base has
// such a method, so that [http.Client.CloseIdleConnections] reaches it.
func (t *Transport) CloseIdleConnections() {
	if c, ok := t.base().(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// covers reports whether requests with method get a key and retries.
func (t *Transport) covers(method string) bool {
	if t.Methods == nil {
		return method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch
	}
	for _, m := range t.Methods {
		if strings.EqualFold(m, method) {
			return true
		}
	}
	return false
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// retryable reports whether the outcome of an attempt is worth another.
func (t *Transport) retryable(ctx context.Context, resp *http.Response, err error) bool {
	if err != nil {
		// The caller's context ending is final, but not a timeout of the
		// transport's own (a dial timeout, ResponseHeaderTimeout), which
		// also reports context.DeadlineExceeded. A certificate that does
		// not verify will not verify next time either.
		var certErr *tls.CertificateVerificationError
		return ctx.Err() == nil && !errors.As(err, &certErr)
	}
	switch resp.StatusCode {
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	case http.StatusConflict:
		return t.inProgress(resp)
	}
	return false
}

// inProgress reports whether resp is the middleware's own 409 for a key in
// flight. It reads at most problemPeekLimit bytes of the body and puts
// them back, so the caller sees the body whole either way.
func (t *Transport) inProgress(resp *http.Response) bool {
	mediaType, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || mediaType != "application/problem+json" || resp.Body == nil {
		return false
	}
	prefix, err := io.ReadAll(io.LimitReader(resp.Body, problemPeekLimit))
	resp.Body = &peekedBody{Reader: io.MultiReader(bytes.NewReader(prefix), resp.Body), Closer: resp.Body}
	if err != nil {
		return false
	}
	var problem struct {
		Type string `json:"type"`
	}
	if json.Unmarshal(prefix, &problem) != nil {
		return false // not JSON, or longer than any problem the middleware writes
	}
	base := t.ProblemTypeBase
	if base == "" {
		base = DefaultProblemTypeBase
	}
	return problem.Type == base+ProblemInProgress
}

// peekedBody is a response body of which a prefix was read and put back.
type peekedBody struct {
	io.Reader
	io.Closer
}

// wait returns how long to wait before the attempt after attempt, and
// false when no retry should be made: the server asks for a longer wait
// than MaxDelay, or the wait would outlast the context's deadline.
func (t *Transport) wait(ctx context.Context, attempt int, resp *http.Response) (time.Duration, bool) {
	baseDelay, maxDelay := t.BaseDelay, t.MaxDelay
	if baseDelay <= 0 {
		baseDelay = DefaultBaseDelay
	}
	if maxDelay <= 0 {
		maxDelay = DefaultMaxDelay
	}
	ceiling := maxDelay
	if shift := attempt - 1; shift < 62 && baseDelay<<shift > 0 && baseDelay<<shift < maxDelay {
		ceiling = baseDelay << shift
	}
	d := t.jitterFunc()(ceiling)
	if resp != nil {
		if after, ok := retryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
			if after > maxDelay {
				return 0, false
			}
			d = max(d, after)
		}
	}
	if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < d {
		return 0, false
	}
	return d, true
}

func (t *Transport) sleepFunc() func(context.Context, time.Duration) error {
	if t.sleep != nil {
		return t.sleep
	}
	return sleepContext
}

func (t *Transport) jitterFunc() func(time.Duration) time.Duration {
	if t.jitter != nil {
		return t.jitter
	}
	return fullJitter
}

// fullJitter draws a wait uniformly from [0, ceiling].
func fullJitter(ceiling time.Duration) time.Duration {
	if ceiling <= 0 {
		return 0
	}
	return rand.N(ceiling + 1)
}

// sleepContext waits d, or until ctx is done, in which case it returns the
// context's error.
func sleepContext(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// retryAfter parses a Retry-After value, delay-seconds or an HTTP-date
// (RFC 9110, section 10.2.3), into a wait from now.
func retryAfter(v string, now time.Time) (time.Duration, bool) {
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs < 0 {
			return 0, false
		}
		if secs > int64(1<<62/time.Second) {
			secs = int64(1 << 62 / time.Second)
		}
		return time.Duration(secs) * time.Second, true
	}
	when, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	return max(when.Sub(now), 0), true
}

// discard reads what is left of a body that will not be used, up to a
// bound, so its connection can serve the next attempt, and closes it.
func discard(body io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(body, drainLimit))
	_ = body.Close()
}

// NewKey returns a new random idempotency key: a version 4 UUID from
// crypto/rand, such as "8e03978e-40d5-43e8-bc93-6894a57f9324". Transport
// calls it for a request without a key; a caller that wants to persist the
// key before sending (to retry across restarts) calls it directly.
func NewKey() string {
	var u [16]byte
	_, _ = cryptorand.Read(u[:]) // never fails (crypto/rand panics instead)
	u[6] = u[6]&0x0f | 0x40      // version 4
	u[8] = u[8]&0x3f | 0x80      // variant 10
	const digits = "0123456789abcdef"
	var out [36]byte
	j := 0
	for i, b := range u {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out[j] = '-'
			j++
		}
		out[j], out[j+1] = digits[b>>4], digits[b&0x0f]
		j += 2
	}
	return string(out[:])
}
