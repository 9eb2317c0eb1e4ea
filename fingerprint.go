package idempotency

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// The default fingerprint identifies a request by its method, path, query,
// Content-Type and the part of its body the handler read. It is kept as
//
//	version   1 byte, fpVersion
//	digest    32 bytes, SHA-256 of the fields below
//	length    8 bytes, big endian: how many body bytes the digest covers
//	flags     1 byte, fpReachedEnd when the body ended after them
//
// The digest covers, each string framed by its 8-byte big-endian length:
// the method; the path with its percent-encoding normalised (hex digits in
// upper case, unreserved characters decoded, so /a%2fb is /a%2Fb but not
// /a/b); the raw query; the number of Content-Type values and each of them
// normalised (media type and parameter names in lower case, charset values
// too, no whitespace around ";"); then the body bytes.
//
// The body part is what the handler read, up to FingerprintBodyLimit: the
// middleware never reads ahead of the handler nor after it returned, so a
// response is never held back to hash a body. A retry matches when its
// first length body bytes hash the same and, if the original body ended
// there, the retry's ends there too.
//
// Records written before this rule hold a 32-byte digest (33 bytes, ending
// 0xff, when the body could not be read); they are compared under the rule
// they were written with (see legacyFingerprint).
const (
	fpVersion    = 2
	fpLen        = 1 + sha256.Size + 8 + 1
	fpReachedEnd = 1
)

// fpSmall is how many bytes of a fingerprint's message (fields and body)
// are gathered and hashed at once; a longer message is hashed as it
// streams. Most requests fit, and then hashing allocates nothing.
const fpSmall = 1024

// fpHash is SHA-256 over a fingerprint's message. It gathers the message in
// buf while it fits and starts a streaming hash only when it outgrows it.
type fpHash struct {
	buf []byte
	h   hash.Hash // nil while the message fits in buf
}

func (x *fpHash) Write(p []byte) {
	if x.h == nil && len(p) <= cap(x.buf)-len(x.buf) {
		x.buf = append(x.buf, p...)
		return
	}
	if x.h == nil {
		x.h = sha256.New()
		x.h.Write(x.buf)
	}
	x.h.Write(p)
}

func (x *fpHash) sum() [sha256.Size]byte {
	if x.h == nil {
		return sha256.Sum256(x.buf)
	}
	return [sha256.Size]byte(x.h.Sum(nil))
}

// appendFields appends to b the request's method, path, query and
// Content-Type values, each framed by its length: the message of the
// fingerprint before the body.
func appendFields(b []byte, r *http.Request) []byte {
	b = appendField(b, r.Method)
	if r.URL != nil {
		b = appendField(b, normalPath(r.URL.EscapedPath()))
		b = appendField(b, r.URL.RawQuery)
	} else {
		b = appendField(b, "")
		b = appendField(b, "")
	}
	ct := r.Header["Content-Type"]
	b = binary.BigEndian.AppendUint64(b, uint64(len(ct)))
	for _, v := range ct {
		b = appendField(b, normalMediaType(v))
	}
	return b
}

func appendField(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(len(s)))
	return append(b, s...)
}

// fpSeal returns the fingerprint of a request whose message, up to its
// first n body bytes, hashes to sum; reachedEnd says whether the body ended
// after them.
func fpSeal(sum [sha256.Size]byte, n int64, reachedEnd bool) []byte {
	fp := make([]byte, 0, fpLen)
	fp = append(fp, fpVersion)
	fp = append(fp, sum[:]...)
	fp = binary.BigEndian.AppendUint64(fp, uint64(n))
	var flags byte
	if reachedEnd {
		flags = fpReachedEnd
	}
	return append(fp, flags)
}

// emptyBodyFingerprint returns the fingerprint of a request with no body
// (nil or http.NoBody): nothing read, and the body ended there.
func emptyBodyFingerprint(r *http.Request) []byte {
	var small [fpSmall]byte
	x := fpHash{buf: appendFields(small[:0], r)}
	return fpSeal(x.sum(), 0, true)
}

// bodyRecorder replaces a request's body for the handler of a first
// execution. It hashes the bytes the handler reads, up to a limit, notes
// whether the body ended or failed, and nothing else: it never reads on its
// own, so a handler that answers without reading the body answers at once.
//
// A handler may read from another goroutine, even after it returned: the
// underlying Read is never made under the lock, so a read that blocks
// blocks no one else, and bytes read after seal are not counted.
type bodyRecorder struct {
	body   io.ReadCloser
	length int64 // declared Content-Length, or -1
	limit  int64

	mu         sync.Mutex // guards the fields below
	hash       fpHash
	n          int64 // bytes read so far
	reachedEnd bool
	failed     bool // a read failed other than with io.EOF
	sealed     bool
}

// Read reads from the request body and takes note of what came.
func (b *bodyRecorder) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if n < 0 || n > len(p) {
		n, err = 0, errBadRead
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sealed {
		return n, err
	}
	if hashed := min(int64(n), b.limit-b.n); hashed > 0 {
		b.hash.Write(p[:hashed])
	}
	b.n += int64(n)
	switch {
	case err != nil && err != io.EOF:
		b.failed = true
	case err == io.EOF, b.length >= 0 && b.n >= b.length:
		// With a declared length the body is whole once that many bytes
		// came: on HTTP/2 the io.EOF comes only with one more Read.
		b.reachedEnd = true
	}
	return n, err
}

// Close closes the request body.
func (b *bodyRecorder) Close() error { return b.body.Close() }

// seal returns the fingerprint of what the handler read. Reads after it
// are not counted.
func (b *bodyRecorder) seal() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sealed = true
	// A body of known length is whole once that many bytes came, even when
	// that is none and the handler never called Read.
	reachedEnd := b.reachedEnd || b.length >= 0 && b.n >= b.length
	return fpSeal(b.hash.sum(), min(b.n, b.limit), reachedEnd && b.n <= b.limit)
}

// errBadRead reports a body reader that returned an impossible count.
var errBadRead = errors.New("idempotency: request body returned an invalid read count")

// matchFingerprint reports whether the retry r has the fingerprint want,
// under the rule want was written with. It reads at most the body bytes
// the first request's handler read, and one more to see that the body
// ends where that one did, bounded by timeout where w lets a read deadline
// be set. A body that cannot be read that far does not match: a response
// is replayed only to a request known to be the same.
func matchFingerprint(w http.ResponseWriter, r *http.Request, want []byte, limit int64, timeout time.Duration) bool {
	if len(want) != fpLen || want[0] != fpVersion {
		return bytes.Equal(legacyFingerprint(r, limit), want)
	}
	n := int64(binary.BigEndian.Uint64(want[1+sha256.Size:]))
	reachedEnd := want[fpLen-1]&fpReachedEnd != 0
	body := r.Body
	if body == nil {
		body = http.NoBody
	}
	x := fpHash{buf: appendFields(make([]byte, 0, 256+min(n, fpSmall)), r)}
	if room := int64(cap(x.buf) - len(x.buf)); n <= room {
		// Read the body part straight into the message.
		got, err := io.ReadFull(body, x.buf[len(x.buf):len(x.buf)+int(n)])
		if int64(got) != n || err != nil {
			return false
		}
		x.buf = x.buf[:len(x.buf)+got]
	} else {
		x.h = sha256.New()
		x.h.Write(x.buf)
		if got, err := io.CopyN(x.h, body, n); got != n || err != nil {
			return false
		}
	}
	if sum := x.sum(); !bytes.Equal(sum[:], want[1:1+sha256.Size]) {
		return false
	}
	if !reachedEnd {
		return true
	}
	if r.ContentLength >= 0 {
		return r.ContentLength == n
	}
	rc := http.NewResponseController(w)
	if rc.SetReadDeadline(time.Now().Add(timeout)) == nil {
		defer rc.SetReadDeadline(time.Time{})
	}
	var one [1]byte
	got, err := io.ReadFull(body, one[:])
	return got == 0 && err == io.EOF
}

// legacyFingerprint returns the fingerprint of r under the rule of records
// before version 2: the SHA-256 of the method, the escaped path, the raw
// query and the Content-Type values as sent, each framed by its length,
// then the first limit bytes of the body followed by their count. Nil when
// the body fails before limit bytes or its end: such a retry never matches.
func legacyFingerprint(r *http.Request, limit int64) []byte {
	h := sha256.New()
	var b []byte
	b = appendField(b, r.Method)
	if r.URL != nil {
		b = appendField(b, r.URL.EscapedPath())
		b = appendField(b, r.URL.RawQuery)
	} else {
		b = appendField(b, "")
		b = appendField(b, "")
	}
	ct := r.Header["Content-Type"]
	b = binary.BigEndian.AppendUint64(b, uint64(len(ct)))
	for _, v := range ct {
		b = appendField(b, v)
	}
	h.Write(b)
	var seen int64
	if r.Body != nil && r.Body != http.NoBody && limit > 0 {
		var err error
		seen, err = io.CopyN(h, r.Body, limit)
		if err != nil && err != io.EOF {
			return nil
		}
	}
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(seen)))
	return h.Sum(nil)
}

// normalPath returns the escaped path p with its percent-encoding
// normalised: hex digits in upper case and unreserved characters
// (RFC 3986: letters, digits, "-", ".", "_", "~") decoded. Other escapes,
// %2F among them, stay escaped. p itself is returned when nothing changes.
func normalPath(p string) string {
	i := strings.IndexByte(p, '%')
	if i < 0 {
		return p
	}
	var b strings.Builder
	b.Grow(len(p))
	b.WriteString(p[:i])
	for ; i < len(p); i++ {
		c := p[i]
		if c != '%' || i+2 >= len(p) || !isHex(p[i+1]) || !isHex(p[i+2]) {
			b.WriteByte(c)
			continue
		}
		v := unhex(p[i+1])<<4 | unhex(p[i+2])
		if isUnreserved(v) {
			b.WriteByte(v)
		} else {
			b.WriteByte('%')
			b.WriteByte(upperHex(p[i+1]))
			b.WriteByte(upperHex(p[i+2]))
		}
		i += 2
	}
	if b.Len() == len(p) && b.String() == p {
		return p
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

func upperHex(c byte) byte {
	if 'a' <= c && c <= 'f' {
		return c - 'a' + 'A'
	}
	return c
}

func isUnreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

// normalMediaType returns a Content-Type value in a form that equivalent
// values share: the media type and parameter names in lower case, charset
// values too (unquoted), and no whitespace around ";" or "=". v itself is
// returned when it is already in that form.
func normalMediaType(v string) string {
	if !strings.ContainsFunc(v, func(c rune) bool { return 'A' <= c && c <= 'Z' || c == ' ' || c == '\t' || c == '"' }) {
		return v
	}
	var b strings.Builder
	for i, part := range strings.Split(v, ";") {
		part = strings.TrimSpace(part)
		if i > 0 {
			b.WriteByte(';')
			name, value, ok := strings.Cut(part, "=")
			name = strings.ToLower(strings.TrimSpace(name))
			value = strings.TrimSpace(value)
			if name == "charset" {
				value = strings.ToLower(strings.Trim(value, `"`))
			}
			b.WriteString(name)
			if ok {
				b.WriteByte('=')
				b.WriteString(value)
			}
			continue
		}
		b.WriteString(strings.ToLower(part))
	}
	if b.String() == v {
		return v
	}
	return b.String()
}
