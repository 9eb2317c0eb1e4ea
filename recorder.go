package idempotency

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
)

// recMaxPooledBuf is the largest body buffer capacity that reset keeps for
// the next request. Larger buffers are dropped so that one big response does
// not pin its memory in the pool.
const recMaxPooledBuf = 64 << 10

// recMinGrow is the smallest capacity the body buffer grows to.
const recMinGrow = 512

// errRecHijackNotSupported is returned by Hijack when no writer in the
// Unwrap chain can hijack the connection (HTTP/2, or a wrapper that hides
// it). It matches [http.ErrNotSupported].
var errRecHijackNotSupported = fmt.Errorf("idempotency: hijack: %w", http.ErrNotSupported)

// recorder is the http.ResponseWriter the handler of a first execution
// writes to. It writes through to the client as the handler writes, so the
// first client sees exactly what the handler wrote, when it wrote it, and it
// captures the final status, a snapshot of the header taken when that status
// was written, and up to maxBody bytes of the body, for the store.
//
// It follows the rules of net/http and httptest.ResponseRecorder: the first
// final WriteHeader wins and later ones are not forwarded, the first Write
// (or Flush) implies 200, informational 1xx responses (except 101) pass
// through and are neither final nor captured. It keeps the capabilities of
// the writer it wraps through Unwrap, so [http.ResponseController] reaches
// deadlines, and it implements Flush, FlushError, Hijack and EnableFullDuplex
// by delegating to the wrapped writer.
//
// It deliberately does not implement io.ReaderFrom: io.Copy into it must go
// through Write, or the bytes would bypass the capture.
//
// A recorder is embedded by value in per-request state so that it can be
// pooled; its zero value is unusable until init. Like any ResponseWriter it
// is not safe for concurrent use.
type recorder struct {
	w           http.ResponseWriter
	beforeFinal func()

	maxBody int   // capture cap in bytes
	declLen int64 // declared Content-Length of the final header, or -1
	written int64 // body bytes that belong to the response so far
	flushed int64 // written at the first flush, or -1: net/http sniffs at most that much

	code int            // final status once wrote is set
	snap headerSnapshot // the header as it was when the final header was written
	buf  []byte         // captured body, at most maxBody bytes

	wrote  bool // the final header went out
	over   bool // more than maxBody bytes were written
	hijack bool // Hijack succeeded
	duplex bool // EnableFullDuplex succeeded
}

// init prepares rec to wrap w. maxBody is the capture cap in bytes (a
// negative value counts as 0). beforeFinal, if not nil, is called exactly
// once, synchronously, right before the final response header is sent to w:
// on the final WriteHeader, the first Write, Flush or FlushError, whichever
// comes first, or before a Hijack that w supports.
func (rec *recorder) init(w http.ResponseWriter, maxBody int, beforeFinal func()) {
	rec.w = w
	rec.beforeFinal = beforeFinal
	rec.maxBody = max(maxBody, 0)
	rec.declLen = -1
	rec.written = 0
	rec.flushed = -1
	rec.code = 0
	rec.snap.reset()
	rec.buf = rec.buf[:0]
	rec.wrote = false
	rec.over = false
	rec.hijack = false
	rec.duplex = false
}

// reset drops every reference rec holds so that it can go back to a pool.
// The body buffer is kept, emptied, when its capacity is small.
func (rec *recorder) reset() {
	buf := rec.buf[:0]
	if cap(buf) > recMaxPooledBuf {
		buf = nil
	}
	snap := rec.snap
	snap.reset()
	*rec = recorder{buf: buf, snap: snap}
}

// status returns the final status: the one written, or 200 when the handler
// wrote nothing at all, as net/http then sends. It is never 0.
func (rec *recorder) status() int {
	if rec.code == 0 {
		return http.StatusOK
	}
	return rec.code
}

// header returns the header as it was when the final header was written,
// or, when nothing was written, as it is now. It shares no slice with the
// wrapped writer's header, and is valid until the next init or reset.
func (rec *recorder) header() *headerSnapshot {
	if !rec.wrote {
		rec.snap.take(rec.w.Header())
	}
	return &rec.snap
}

// body returns the captured body. It aliases rec's buffer: a caller that
// keeps it past reset copies it. Once overflowed reports true, body holds
// only a prefix of what was written.
func (rec *recorder) body() []byte { return rec.buf }

// sniffedType returns the Content-Type net/http sent for a response whose
// header had none: it sniffs the first chunk it sends, which holds every
// byte written before the first flush (at least 512 when none came first).
// ok is false when net/http sent no Content-Type.
func (rec *recorder) sniffedType() (ctype string, ok bool) {
	n := int64(len(rec.buf))
	if rec.flushed >= 0 {
		n = min(n, rec.flushed)
	}
	n = min(n, 512)
	if n == 0 {
		return "", false
	}
	return http.DetectContentType(rec.buf[:n]), true
}

// overflowed reports whether the handler wrote more than maxBody bytes of
// body; capture stopped there, while writing through to the client went on.
func (rec *recorder) overflowed() bool { return rec.over }

// hijacked reports whether the handler hijacked the connection.
func (rec *recorder) hijacked() bool { return rec.hijack }

// fullDuplex reports whether the handler enabled full duplex successfully.
func (rec *recorder) fullDuplex() bool { return rec.duplex }

// wroteHeader reports whether the final header went out.
func (rec *recorder) wroteHeader() bool { return rec.wrote }

// Header returns the wrapped writer's header map.
func (rec *recorder) Header() http.Header { return rec.w.Header() }

// WriteHeader sends a response header with the given status code. An
// informational code (1xx except 101) is forwarded at once and is not final;
// the first other code is final, snapshots the header and is forwarded; any
// later call is ignored.
func (rec *recorder) WriteHeader(code int) {
	if code < 100 || code > 999 {
		// The same programmer error net/http panics on.
		panic(fmt.Sprintf("idempotency: invalid WriteHeader code %d", code))
	}
	switch {
	case rec.hijack:
		rec.w.WriteHeader(code) // the wrapped writer reports the misuse
	case rec.wrote:
		// First WriteHeader wins; net/http would only log this one.
	case code < 200 && code != http.StatusSwitchingProtocols:
		rec.w.WriteHeader(code)
	default:
		rec.writeFinal(code)
	}
}

// writeFinal runs beforeFinal, snapshots the header and sends the final
// header with code.
func (rec *recorder) writeFinal(code int) {
	rec.runBeforeFinal()
	h := rec.w.Header()
	rec.snap.take(h)
	rec.declLen = -1
	if cl := h["Content-Length"]; len(cl) > 0 {
		// As net/http does, an unparsable value declares nothing.
		if v, err := strconv.ParseInt(cl[0], 10, 64); err == nil && v >= 0 {
			rec.declLen = v
		}
	}
	rec.code = code
	rec.wrote = true
	rec.w.WriteHeader(code)
}

// runBeforeFinal calls beforeFinal the first time only.
func (rec *recorder) runBeforeFinal() {
	if f := rec.beforeFinal; f != nil {
		rec.beforeFinal = nil
		f()
	}
}

// Write writes p through to the client, sending the implied 200 header
// first if none was written, and captures p. It returns the wrapped writer's
// result. When the client has gone away the bytes are still captured, so the
// stored response is complete; bytes that are not part of the response
// (refused by net/http, beyond the declared Content-Length, or for a status
// that has no body) are not.
func (rec *recorder) Write(p []byte) (int, error) {
	if rec.hijack {
		return rec.w.Write(p)
	}
	if !rec.wrote {
		rec.writeFinal(http.StatusOK)
	}
	n, err := rec.w.Write(p)
	rec.capture(len(p), n, err, p, "")
	return n, err
}

// WriteString is Write for a string, so that io.WriteString reaches the
// wrapped writer's WriteString without a copy.
func (rec *recorder) WriteString(s string) (int, error) {
	if rec.hijack {
		return io.WriteString(rec.w, s)
	}
	if !rec.wrote {
		rec.writeFinal(http.StatusOK)
	}
	n, err := io.WriteString(rec.w, s)
	rec.capture(len(s), n, err, nil, s)
	return n, err
}

// capture appends to the buffer the part of a write of size bytes (p or s)
// that belongs to the response, given the wrapped writer's result n, err.
func (rec *recorder) capture(size, n int, err error, p []byte, s string) {
	keep := size
	if err != nil && (errors.Is(err, http.ErrContentLength) ||
		errors.Is(err, http.ErrBodyNotAllowed) || errors.Is(err, http.ErrHijacked)) {
		keep = n
	}
	if !recBodyAllowed(rec.code) {
		keep = 0
	}
	// Bytes past a declared Content-Length are not part of the response,
	// whether the server refuses them (HTTP/1.x refuses the whole write
	// that crosses it) or lets them through for the client to drop
	// (HTTP/2 before the header is flushed).
	if rec.declLen >= 0 {
		keep = int(min(int64(keep), max(rec.declLen-rec.written, 0)))
	}
	if keep <= 0 {
		return
	}
	rec.written += int64(keep)
	if rec.over {
		return
	}
	if len(rec.buf)+keep > rec.maxBody {
		// Stop capturing for good: the response will not be stored, and
		// the buffer must not grow past the cap.
		rec.over = true
		return
	}
	if cap(rec.buf)-len(rec.buf) < keep {
		rec.grow(keep)
	}
	if p != nil {
		rec.buf = append(rec.buf, p[:keep]...)
	} else {
		rec.buf = append(rec.buf, s[:keep]...)
	}
}

// grow makes room for n more bytes, doubling but never beyond maxBody.
func (rec *recorder) grow(n int) {
	need := len(rec.buf) + n
	c := min(max(2*cap(rec.buf), need, recMinGrow), rec.maxBody)
	buf := make([]byte, len(rec.buf), c)
	copy(buf, rec.buf)
	rec.buf = buf
}

// Flush is FlushError without the error.
func (rec *recorder) Flush() { _ = rec.FlushError() }

// FlushError sends the implied 200 header if none was written and flushes
// buffered data to the client. It returns an error matching
// [http.ErrNotSupported] when the wrapped writer cannot flush.
func (rec *recorder) FlushError() error {
	if !rec.wrote && !rec.hijack {
		rec.writeFinal(http.StatusOK)
	}
	if rec.flushed < 0 {
		rec.flushed = rec.written
	}
	return http.NewResponseController(rec.w).Flush()
}

// Hijack lets the handler take over the connection. Where the wrapped writer
// cannot hijack (HTTP/2), it returns an error matching
// [http.ErrNotSupported].
func (rec *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h := recFindHijacker(rec.w)
	if h == nil {
		return nil, nil, errRecHijackNotSupported
	}
	if !rec.wrote {
		// The read-ahead of the request body must happen while the
		// connection is still the server's.
		rec.runBeforeFinal()
	}
	conn, brw, err := h.Hijack()
	if err == nil {
		rec.hijack = true
	}
	return conn, brw, err
}

// EnableFullDuplex asks the wrapped writer to let the handler read the
// request body while writing the response, and records whether it did.
func (rec *recorder) EnableFullDuplex() error {
	err := http.NewResponseController(rec.w).EnableFullDuplex()
	if err == nil {
		rec.duplex = true
	}
	return err
}

// Unwrap returns the wrapped writer, for [http.ResponseController].
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.w }

// recFindHijacker walks the Unwrap chain from w, as http.ResponseController
// does, and returns the first writer that can hijack, or nil.
func recFindHijacker(w http.ResponseWriter) http.Hijacker {
	for {
		switch t := w.(type) {
		case http.Hijacker:
			return t
		case interface{ Unwrap() http.ResponseWriter }:
			w = t.Unwrap()
		default:
			return nil
		}
	}
}

// recBodyAllowed reports whether a response with status code may have a
// body, as net/http decides.
func recBodyAllowed(code int) bool {
	switch {
	case code >= 100 && code <= 199, code == http.StatusNoContent, code == http.StatusNotModified:
		return false
	}
	return true
}

// headerSnapshot is a copy of a header map as it was at one moment: its
// fields in the map's order, and all their values in one slice. It shares
// the map's strings but none of its slices, so later changes to the map do
// not reach it. It is kept with the recorder from request to request, so
// taking one allocates nothing once its slices have grown.
type headerSnapshot struct {
	fields []snapField
	values []string
}

// snapField is one field of a headerSnapshot: its name and how many of the
// snapshot's values, following those of the fields before it, are its.
type snapField struct {
	name   string
	values int
}

// snapMaxPooled is the most fields or values a snapshot keeps room for
// between requests.
const snapMaxPooled = 256

// take replaces the snapshot with a copy of h.
func (s *headerSnapshot) take(h http.Header) {
	s.reset()
	for name, values := range h {
		s.fields = append(s.fields, snapField{name: name, values: len(values)})
		s.values = append(s.values, values...)
	}
}

// reset empties the snapshot and drops its references to strings, keeping
// the room of small slices.
func (s *headerSnapshot) reset() {
	clear(s.fields)
	clear(s.values)
	s.fields, s.values = s.fields[:0], s.values[:0]
	if cap(s.fields) > snapMaxPooled || cap(s.values) > snapMaxPooled {
		*s = headerSnapshot{}
	}
}

// each calls fn for each field, with its values, in order; the values
// slice aliases the snapshot.
func (s *headerSnapshot) each(fn func(name string, values []string)) {
	off := 0
	for _, f := range s.fields {
		fn(f.name, s.values[off:off+f.values:off+f.values])
		off += f.values
	}
}

// get returns the values of the field named exactly name, and whether the
// snapshot has it (possibly with no values). The values alias the snapshot.
func (s *headerSnapshot) get(name string) ([]string, bool) {
	off := 0
	for _, f := range s.fields {
		if f.name == name {
			return s.values[off : off+f.values : off+f.values], true
		}
		off += f.values
	}
	return nil, false
}
