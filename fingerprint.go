package idempotency

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
	"io"
	"net/http"
	"sync"
)

// The default fingerprint is the SHA-256 of these fields, in this order,
// each framed so that no two requests share an encoding:
//
//	uint64be(len(method)) || method
//	uint64be(len(path))   || path     r.URL.EscapedPath()
//	uint64be(len(query))  || query    r.URL.RawQuery
//	uint64be(n) || n × (uint64be(len(v)) || v)   the Content-Type values, in order
//	prefix || uint64be(len(prefix))   the first limit bytes of the body
//
// The body comes last and is framed by its length after it, since it is
// hashed as it streams and its length is known only at the end. Everything
// before it is self-delimiting, so the trailing length is enough.
//
// The path is the escaped path (RawPath when it is a valid encoding of Path,
// else Path escaped), that is, the path as the client sent it up to
// canonical escaping: /a%2Fb and /a/b are different requests, as they may
// be to a router. Bodies that differ only after limit bytes are the same
// request: the key is the identity; the fingerprint only detects a key
// reused for another request.

const (
	// fpScratchSize is the buffer that gathers framed header fields before
	// they are written to the hash.
	fpScratchSize = 256
	// fpReadBufSize is the size of the pooled buffer used to hash and
	// discard body bytes nobody else reads.
	fpReadBufSize = 32 << 10
	// fpInlineSize is the read-ahead space held inside a bodyFingerprint,
	// enough for a small body without allocating.
	fpInlineSize = 512
	// fpMaxEmptyReads is how many reads in a row may return no data and no
	// error before a body is treated as broken (as bufio does).
	fpMaxEmptyReads = 100
)

// fpHasher is a SHA-256 state with the scratch space it needs to take
// strings and length frames without allocating. It is pooled.
type fpHasher struct {
	h       hash.Hash
	n       int // bytes pending in scratch
	scratch [fpScratchSize]byte
	sum     [sha256.Size]byte
}

// fpHasherPool holds idle hashers, fpReadBufPool idle read buffers; both
// are caches with no observable state.
var (
	fpHasherPool  = sync.Pool{New: func() any { return &fpHasher{h: sha256.New()} }}
	fpReadBufPool = sync.Pool{New: func() any { return new([fpReadBufSize]byte) }}
)

// fpBegin returns a pooled hasher that has hashed the request's method,
// path, query and Content-Type; the body comes next.
func fpBegin(r *http.Request) *fpHasher {
	x := fpHasherPool.Get().(*fpHasher)
	x.begin(r)
	return x
}

// begin starts x afresh, on the request's method, path, query and
// Content-Type.
func (x *fpHasher) begin(r *http.Request) {
	x.h.Reset()
	x.n = 0
	x.writeField(r.Method)
	if r.URL != nil {
		x.writeField(r.URL.EscapedPath())
		x.writeField(r.URL.RawQuery)
	} else {
		x.writeField("")
		x.writeField("")
	}
	ct := r.Header["Content-Type"]
	x.writeUint(uint64(len(ct)))
	for _, v := range ct {
		x.writeField(v)
	}
}

// fpEnd returns the digest of x (see end) and returns x to its pool.
func fpEnd(x *fpHasher, hashed int64) [sha256.Size]byte {
	digest := x.end(hashed)
	fpHasherPool.Put(x)
	return digest
}

// end hashes the body length frame, hashed, and returns the digest.
func (x *fpHasher) end(hashed int64) [sha256.Size]byte {
	x.writeUint(uint64(hashed))
	x.flush()
	x.h.Sum(x.sum[:0])
	return x.sum
}

func (x *fpHasher) flush() {
	if x.n > 0 {
		x.h.Write(x.scratch[:x.n])
		x.n = 0
	}
}

func (x *fpHasher) writeUint(v uint64) {
	if len(x.scratch)-x.n < 8 {
		x.flush()
	}
	binary.BigEndian.PutUint64(x.scratch[x.n:], v)
	x.n += 8
}

// writeField hashes s framed by its length.
func (x *fpHasher) writeField(s string) {
	x.writeUint(uint64(len(s)))
	for len(s) > 0 {
		if x.n == len(x.scratch) {
			x.flush()
		}
		c := copy(x.scratch[x.n:], s)
		x.n += c
		s = s[c:]
	}
}

// writeBody hashes body bytes as they are.
func (x *fpHasher) writeBody(p []byte) {
	x.flush()
	x.h.Write(p)
}

// fpHashBody reads body until limit bytes in total have been seen (seen of
// them already were), hashing and discarding them, using a pooled buffer
// and never reading past limit. It returns the new total, whether the body
// ended, and the first error other than io.EOF.
func fpHashBody(x *fpHasher, body io.Reader, seen, limit int64) (int64, bool, error) {
	buf := fpReadBufPool.Get().(*[fpReadBufSize]byte)
	defer fpReadBufPool.Put(buf)
	empty := 0
	for seen < limit {
		p := buf[:min(int64(len(buf)), limit-seen)]
		n, err := body.Read(p)
		if n < 0 || n > len(p) {
			return seen, false, errFpBadRead
		}
		x.writeBody(p[:n])
		seen += int64(n)
		switch {
		case err == io.EOF:
			return seen, true, nil
		case err != nil:
			return seen, false, err
		case n == 0:
			if empty++; empty >= fpMaxEmptyReads {
				return seen, false, io.ErrNoProgress
			}
		default:
			empty = 0
		}
	}
	return seen, false, nil
}

// errFpBadRead reports a body reader that returned an impossible count.
var errFpBadRead = errors.New("idempotency: request body returned an invalid read count")

// fingerprintRequest returns the default fingerprint of r, for a request
// that will not run (a retry to be checked against a stored record). It
// hashes the first limit bytes of r.Body as a stream through a fixed-size
// pooled buffer and discards them; the rest of the body is left unread. ok
// is false if the body failed to read before limit bytes or its end.
//
// Its digest equals what a [bodyFingerprint] computes for the same request,
// however the handler reads the body.
func fingerprintRequest(r *http.Request, limit int64) (digest [sha256.Size]byte, ok bool) {
	x := fpBegin(r)
	var seen int64
	if r.Body != nil && r.Body != http.NoBody && limit > 0 {
		var err error
		seen, _, err = fpHashBody(x, r.Body, 0, limit)
		ok = err == nil
	} else {
		ok = true
	}
	return fpEnd(x, min(seen, max(limit, 0))), ok
}

// bodyFingerprint computes the default fingerprint of a request that runs,
// hashing the body as the handler reads it, so that the body is never
// buffered whole. It replaces r.Body for the handler. It is meant to be
// embedded by value in a pooled per-request struct; it is not safe for
// concurrent use (neither is a request body).
//
// Bytes are hashed when they come out of the original body, whoever asks
// for them: the handler through Read, readAhead, or sum at the end. Only the
// first limit of them are hashed.
type bodyFingerprint struct {
	hs     *fpHasher     // own while hashing; nil once sum has run
	body   io.ReadCloser // the original body; nil when there is none
	length int64         // r.ContentLength: -1 when unknown
	limit  int64         // how many body bytes are hashed
	seen   int64         // bytes read from body so far

	// buf[off:] holds bytes read ahead and not yet returned to the
	// handler. It never holds more than limit bytes.
	buf []byte
	off int

	err    error // non-EOF error met by readAhead, returned once buf drains
	eof    bool  // body returned io.EOF
	closed bool  // the handler closed its body

	digest [sha256.Size]byte // result of sum, once hs is nil
	ok     bool

	inline [fpInlineSize]byte // first read-ahead space, reused when pooled
	own    *fpHasher          // the hasher, made once and kept when pooled
}

var _ io.ReadCloser = (*bodyFingerprint)(nil)

// init hashes r's method, path, query and Content-Type, and, when r has a
// body (neither nil nor http.NoBody), replaces r.Body with f so that the
// body is hashed as the handler reads it. limit is the number of body bytes
// hashed; it should be positive (zero hashes no body).
func (f *bodyFingerprint) init(r *http.Request, limit int64) {
	if f.own == nil {
		f.own = &fpHasher{h: sha256.New()}
	}
	f.hs = f.own
	f.hs.begin(r)
	f.limit = max(limit, 0)
	f.length = r.ContentLength
	if r.Body != nil && r.Body != http.NoBody {
		f.body = r.Body
		r.Body = f
	}
}

// Read serves bytes read ahead first, then reads the original body. After
// Close it returns http.ErrBodyReadAfterClose, as a server's body does.
func (f *bodyFingerprint) Read(p []byte) (int, error) {
	if f.off < len(f.buf) {
		n := copy(p, f.buf[f.off:])
		f.off += n
		if f.off == len(f.buf) {
			f.buf, f.off = nil, 0
		}
		return n, nil
	}
	switch {
	case f.closed:
		return 0, http.ErrBodyReadAfterClose
	case f.err != nil:
		return 0, f.err
	case f.eof || f.body == nil:
		return 0, io.EOF
	}
	n, err := f.body.Read(p)
	if n < 0 || n > len(p) {
		return 0, errFpBadRead
	}
	f.consume(p[:n])
	if err == io.EOF {
		f.eof = true
	}
	return n, err
}

// Close marks the body closed for the handler and drops bytes read ahead.
// It does not close the original body: the server closes it once the
// handler returns, and sum may still need the rest of its first limit
// bytes.
func (f *bodyFingerprint) Close() error {
	f.closed = true
	f.buf, f.off = nil, 0
	return nil
}

// consume hashes the part of p, just read from the original body, that
// falls within the first limit bytes.
func (f *bodyFingerprint) consume(p []byte) {
	if f.seen < f.limit && f.hs != nil {
		f.hs.writeBody(p[:min(int64(len(p)), f.limit-f.seen)])
	}
	f.seen += int64(len(p))
}

// readAhead reads the original body until limit bytes in total have been
// seen or it ends or fails, keeping the bytes the handler has not read yet
// in a buffer (at most limit bytes) that later Reads return first. It is
// called when the final response header is about to go out on HTTP/1.x,
// where net/http may discard an unread body. A read error is kept and
// returned by Read once the buffer drains, as the original body would have
// returned it.
func (f *bodyFingerprint) readAhead() {
	if f.body == nil || f.eof || f.err != nil || f.hs == nil || f.seen >= f.limit {
		return
	}
	if f.closed {
		// The handler is done with the body and will read no more of it:
		// hash the rest of the prefix now, before net/http discards it.
		var err error
		f.seen, f.eof, err = fpHashBody(f.hs, f.body, f.seen, f.limit)
		if err != nil {
			f.err = err
		}
		return
	}
	if f.off > 0 { // keep the unread bytes at the front
		n := copy(f.buf, f.buf[f.off:])
		f.buf, f.off = f.buf[:n], 0
	}
	if f.buf == nil {
		f.buf = f.inline[:0]
	}
	empty := 0
	// A body that declared its length is complete once that many bytes are
	// in, even before it reports io.EOF.
	for f.seen < f.limit && (f.length < 0 || f.seen < f.length) {
		if len(f.buf) == cap(f.buf) {
			f.grow()
		}
		end := len(f.buf) + int(min(int64(cap(f.buf)-len(f.buf)), f.limit-f.seen))
		p := f.buf[len(f.buf):end]
		n, err := f.body.Read(p)
		if n < 0 || n > len(p) {
			f.err = errFpBadRead
			return
		}
		f.consume(p[:n])
		f.buf = f.buf[:len(f.buf)+n]
		switch {
		case err == io.EOF:
			f.eof = true
			return
		case err != nil:
			f.err = err
			return
		case n == 0:
			if empty++; empty >= fpMaxEmptyReads {
				f.err = io.ErrNoProgress
				return
			}
		default:
			empty = 0
		}
	}
}

// grow enlarges the full read-ahead buffer, never beyond what limit still
// allows nor beyond the declared body length. It about doubles the buffer
// at each step, so that memory follows the bytes that actually arrive, not
// what a client merely declares.
func (f *bodyFingerprint) grow() {
	rest := f.limit - f.seen // > 0
	if left := f.length - f.seen; f.length >= 0 && left > 0 {
		rest = min(rest, left)
	}
	rest = min(rest, max(int64(cap(f.buf)), fpReadBufSize))
	b := make([]byte, len(f.buf), int64(len(f.buf))+rest)
	copy(b, f.buf)
	f.buf = b
}

// sum finishes the fingerprint: if fewer than limit bytes were read from the
// original body and it has not ended, it reads, hashes and discards the rest
// of the first limit bytes, then returns the digest. ok is false if the body
// could not be read that far (the client went away). It is called once the
// handler has returned; later calls return the same result.
func (f *bodyFingerprint) sum() (digest [sha256.Size]byte, ok bool) {
	if f.hs == nil {
		return f.digest, f.ok
	}
	ok = f.err == nil
	if ok && f.body != nil && !f.eof && f.seen < f.limit {
		var err error
		f.seen, f.eof, err = fpHashBody(f.hs, f.body, f.seen, f.limit)
		ok = err == nil
	}
	f.digest, f.ok = f.hs.end(min(f.seen, f.limit)), ok
	f.hs = nil
	return f.digest, f.ok
}

// reset drops every reference f holds so that its owner can be pooled.
func (f *bodyFingerprint) reset() {
	f.hs, f.body, f.buf, f.err = nil, nil, nil, nil
	f.length, f.limit, f.seen, f.off = 0, 0, 0, 0
	f.eof, f.closed, f.ok = false, false, false
	f.digest = [sha256.Size]byte{}
}
