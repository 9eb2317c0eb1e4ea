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

// errHijackNotSupported is returned by Hijack when no writer in the Unwrap
// chain can hijack the connection (HTTP/2, or a wrapper that hides it). It
// matches [http.ErrNotSupported].
var errHijackNotSupported = fmt.Errorf("idempotency: hijack: %w", http.ErrNotSupported)

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
// deadlines and full duplex, and it implements Flush, FlushError and Hijack
// by delegating to the wrapped writer.
//
// It deliberately does not implement io.ReaderFrom: io.Copy into it must go
// through Write, or the bytes would bypass the capture. Like any
// ResponseWriter it is not safe for concurrent use.
type recorder struct {
	w       http.ResponseWriter
	maxBody int // capture cap in bytes

	code    int         // final status, once wrote is set
	snap    http.Header // the header as it was when the final header was written
	declLen int64       // Content-Length the final header declared, or -1
	written int64       // body bytes that belong to the response so far
	flushed int64       // written at the first flush, or -1: net/http sniffs at most that much
	buf     []byte      // captured body, at most maxBody bytes

	wrote    bool // the final header went out
	over     bool // more than maxBody bytes were written
	hijacked bool // Hijack succeeded
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
// or, when nothing was written, as it is now.
func (rec *recorder) header() http.Header {
	if !rec.wrote {
		return rec.w.Header()
	}
	return rec.snap
}

// incomplete reports whether the body is shorter than the Content-Length
// the handler declared: its client saw a broken response.
func (rec *recorder) incomplete() bool {
	return rec.declLen >= 0 && rec.written < rec.declLen && bodyAllowed(rec.status())
}

// sniffedType returns the Content-Type net/http sent for a response whose
// header had none: it sniffs the first chunk it sends, which holds every
// byte written before the first flush (at most 512 of them count). ok is
// false when net/http sent no Content-Type.
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
	case rec.hijacked:
		rec.w.WriteHeader(code) // the wrapped writer reports the misuse
	case rec.wrote:
		// First WriteHeader wins; net/http would only log this one.
	case code < 200 && code != http.StatusSwitchingProtocols:
		rec.w.WriteHeader(code)
	default:
		rec.writeFinal(code)
	}
}

// writeFinal snapshots the header and sends the final header with code.
func (rec *recorder) writeFinal(code int) {
	h := rec.w.Header()
	rec.snap = h.Clone()
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

// Write writes p through to the client, sending the implied 200 header
// first if none was written, and captures p. It returns the wrapped writer's
// result. When the client has gone away the bytes are still captured, so the
// stored response is complete; bytes that are not part of the response
// (refused by net/http, beyond the declared Content-Length, or for a status
// that has no body) are not.
func (rec *recorder) Write(p []byte) (int, error) {
	if rec.hijacked {
		return rec.w.Write(p)
	}
	if !rec.wrote {
		rec.writeFinal(http.StatusOK)
	}
	n, err := rec.w.Write(p)
	rec.capture(len(p), p, "", n, err)
	return n, err
}

// WriteString is Write for a string, so that io.WriteString reaches the
// wrapped writer's WriteString without a copy.
func (rec *recorder) WriteString(s string) (int, error) {
	if rec.hijacked {
		return io.WriteString(rec.w, s)
	}
	if !rec.wrote {
		rec.writeFinal(http.StatusOK)
	}
	n, err := io.WriteString(rec.w, s)
	rec.capture(len(s), nil, s, n, err)
	return n, err
}

// capture appends to the buffer the part of a write of size bytes, p or s,
// that belongs to the response, given the wrapped writer's result n, err.
func (rec *recorder) capture(size int, p []byte, s string, n int, err error) {
	keep := size
	if errors.Is(err, http.ErrContentLength) || errors.Is(err, http.ErrBodyNotAllowed) || errors.Is(err, http.ErrHijacked) {
		keep = n
	}
	if !bodyAllowed(rec.code) {
		keep = 0
	}
	// Bytes past a declared Content-Length are not part of the response,
	// whether the server refuses them (HTTP/1.x) or lets them through for
	// the client to drop (HTTP/2 before the header is flushed).
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
	if need := len(rec.buf) + keep; need > cap(rec.buf) {
		// The first write gets what it needs, or the declared length:
		// most responses are written at once, and a stored body should
		// not carry spare room. Later ones double it, never past the cap.
		size := max(2*cap(rec.buf), need)
		if rec.buf == nil {
			size = max(need, int(min(rec.declLen, int64(rec.maxBody))))
		}
		buf := make([]byte, len(rec.buf), min(size, rec.maxBody))
		copy(buf, rec.buf)
		rec.buf = buf
	}
	if p != nil {
		rec.buf = append(rec.buf, p[:keep]...)
	} else {
		rec.buf = append(rec.buf, s[:keep]...)
	}
}

// Flush is FlushError without the error.
func (rec *recorder) Flush() { _ = rec.FlushError() }

// FlushError sends the implied 200 header if none was written and flushes
// buffered data to the client. It returns an error matching
// [http.ErrNotSupported] when the wrapped writer cannot flush.
func (rec *recorder) FlushError() error {
	if !rec.wrote && !rec.hijacked {
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
	h := findHijacker(rec.w)
	if h == nil {
		return nil, nil, errHijackNotSupported
	}
	conn, brw, err := h.Hijack()
	if err == nil {
		rec.hijacked = true
	}
	return conn, brw, err
}

// Unwrap returns the wrapped writer, for [http.ResponseController].
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.w }

// findHijacker walks the Unwrap chain from w, as http.ResponseController
// does, and returns the first writer that can hijack, or nil.
func findHijacker(w http.ResponseWriter) http.Hijacker {
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
