package idempotency

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fpTestBody is a request body that returns data in chunks of random size,
// sometimes returns no data, sometimes returns io.EOF with the last data,
// and can fail after a number of bytes. It records whether it was closed
// and how many bytes it handed out.
type fpTestBody struct {
	data     []byte
	off      int
	rng      *rand.Rand // nil: whole reads
	failAt   int        // fail once off reaches it; -1 never
	failErr  error
	closed   bool
	maxChunk int
}

var errFpTestBody = errors.New("fp test: connection reset")

func (b *fpTestBody) Read(p []byte) (int, error) {
	if b.failAt >= 0 && b.off >= b.failAt {
		return 0, b.failErr
	}
	if b.off == len(b.data) {
		return 0, io.EOF
	}
	n := len(p)
	if b.rng != nil {
		if b.rng.IntN(8) == 0 {
			return 0, nil
		}
		n = min(n, 1+b.rng.IntN(b.maxChunk))
	}
	end := min(len(b.data), b.off+n)
	if b.failAt >= 0 {
		end = min(end, b.failAt)
	}
	n = copy(p, b.data[b.off:end])
	b.off += n
	if b.off == len(b.data) && (b.rng == nil || b.rng.IntN(2) == 0) {
		return n, io.EOF
	}
	return n, nil
}

func (b *fpTestBody) Close() error {
	b.closed = true
	return nil
}

// fpTestReq describes a request; fpTestNew builds a fresh one each time so
// that both fingerprint paths see the same request.
type fpTestReq struct {
	method, target string
	ctype          []string
	body           []byte // nil: http.NoBody
	knownLength    bool
	seed           uint64 // 0: whole reads
	failAt         int    // -1: never
}

func fpTestNew(t *testing.T, d fpTestReq) (*http.Request, *fpTestBody) {
	t.Helper()
	u, err := url.ParseRequestURI(d.target)
	require.NoError(t, err)
	r := &http.Request{Method: d.method, URL: u, Header: http.Header{}, Body: http.NoBody, ContentLength: 0}
	if d.ctype != nil {
		r.Header["Content-Type"] = d.ctype
	}
	if d.body == nil {
		return r, nil
	}
	b := &fpTestBody{data: d.body, failAt: d.failAt, failErr: errFpTestBody, maxChunk: 1 + len(d.body)/3}
	if d.seed != 0 {
		b.rng = rand.New(rand.NewPCG(d.seed, 7))
	}
	r.Body = b
	r.ContentLength = -1
	if d.knownLength {
		r.ContentLength = int64(len(d.body))
	}
	return r, b
}

// fpTestWant computes the documented default fingerprint independently.
func fpTestWant(method, escapedPath, query string, ctype []string, body []byte, limit int64) [32]byte {
	var b []byte
	field := func(s string) {
		b = binary.BigEndian.AppendUint64(b, uint64(len(s)))
		b = append(b, s...)
	}
	field(method)
	field(escapedPath)
	field(query)
	b = binary.BigEndian.AppendUint64(b, uint64(len(ctype)))
	for _, v := range ctype {
		field(v)
	}
	prefix := body[:min(int64(len(body)), limit)]
	b = append(b, prefix...)
	b = binary.BigEndian.AppendUint64(b, uint64(len(prefix)))
	return sha256.Sum256(b)
}

func fpTestRetry(t *testing.T, d fpTestReq, limit int64) ([32]byte, bool) {
	t.Helper()
	r, _ := fpTestNew(t, d)
	return fingerprintRequest(r, limit)
}

// fpTestStep is one thing a handler does with its body.
type fpTestStep struct {
	read      int  // read up to this many bytes (-1: to EOF)
	bufSize   int  // Read buffer size
	readAhead bool // call readAhead instead of reading
	close     bool // close the body instead
}

// fpTestRun runs a handler that follows steps against a bodyFingerprint and
// returns its digest, checking that the handler saw exactly the body.
func fpTestRun(t *testing.T, d fpTestReq, limit int64, steps []fpTestStep) ([32]byte, bool) {
	t.Helper()
	r, orig := fpTestNew(t, d)
	var f bodyFingerprint
	f.init(r, limit)
	if orig != nil {
		require.Same(t, &f, r.Body, "init replaces the body")
	}
	got := []byte{}
	closed := false
	var readErr error
	for _, s := range steps {
		switch {
		case s.readAhead:
			f.readAhead()
		case s.close:
			require.NoError(t, r.Body.Close())
			closed = true
		default:
			p := make([]byte, max(s.bufSize, 1))
			for want := s.read; want != 0 && readErr == nil; {
				q := p
				if want > 0 {
					q = p[:min(len(p), want)]
				}
				n, err := r.Body.Read(q)
				got = append(got, q[:n]...)
				if want > 0 {
					want -= n
				}
				if closed && orig != nil {
					require.ErrorIs(t, err, http.ErrBodyReadAfterClose)
					require.Zero(t, n)
					break
				}
				if err != nil {
					readErr = err
				}
			}
		}
	}
	if d.body != nil {
		failed := d.failAt >= 0 && d.failAt < len(d.body)
		if readErr == io.EOF {
			assert.Equal(t, d.body, got, "handler read the whole body")
		} else if readErr != nil {
			assert.True(t, failed, "unexpected read error %v", readErr)
			assert.ErrorIs(t, readErr, errFpTestBody)
			assert.Equal(t, d.body[:d.failAt], got)
		} else {
			assert.Equal(t, d.body[:len(got)], got, "handler read a prefix of the body")
		}
	}
	digest, ok := f.sum()
	again, okAgain := f.sum()
	assert.Equal(t, digest, again, "sum is stable")
	assert.Equal(t, ok, okAgain)
	if orig != nil {
		assert.False(t, orig.closed, "the original body is left for the server to close")
		assert.LessOrEqual(t, cap(f.buf), max(int(limit), fpInlineSize), "read-ahead buffer bounded by limit")
	}
	f.reset()
	cleared := f
	cleared.inline = [fpInlineSize]byte{} // scratch space, kept for reuse
	cleared.own = nil                     // the hasher, kept for reuse
	assert.Equal(t, bodyFingerprint{}, cleared, "reset clears everything")
	return digest, ok
}

func fpTestPatterns(n int) map[string][]fpTestStep {
	return map[string][]fpTestStep{
		"reads nothing":             nil,
		"reads all":                 {{read: -1, bufSize: 512}},
		"reads all byte by byte":    {{read: -1, bufSize: 1}},
		"reads a byte":              {{read: 1, bufSize: 1}},
		"reads half":                {{read: n / 2, bufSize: 7}},
		"read-ahead only":           {{readAhead: true}},
		"read-ahead then all":       {{readAhead: true}, {read: -1, bufSize: 3}},
		"read-ahead then part":      {{readAhead: true}, {read: n / 3, bufSize: 5}},
		"part then read-ahead":      {{read: n / 3, bufSize: 4}, {readAhead: true}},
		"part, read-ahead, all":     {{read: n / 3, bufSize: 4}, {readAhead: true}, {read: -1, bufSize: 64}},
		"all then read-ahead":       {{read: -1, bufSize: 64}, {readAhead: true}},
		"read-ahead twice":          {{readAhead: true}, {read: 2, bufSize: 1}, {readAhead: true}, {read: -1, bufSize: 9}},
		"close without reading":     {{close: true}},
		"part then close":           {{read: n / 2, bufSize: 8}, {close: true}, {read: 1, bufSize: 1}},
		"read-ahead, part, close":   {{readAhead: true}, {read: 1, bufSize: 1}, {close: true}},
		"empty reads then all":      {{read: 0}, {read: -1, bufSize: 1 << 16}},
		"read-ahead then read more": {{readAhead: true}, {read: -1, bufSize: 1 << 16}, {read: 10, bufSize: 1}},
	}
}

func TestBodyFingerprintMatchesRetry(t *testing.T) {
	body := make([]byte, 3000)
	for i := range body {
		body[i] = byte(i * 7)
	}
	sizes := []int{0, 1, 511, 512, 513, 1025, 3000}
	limits := []int64{1, 511, 512, 513, 4096}
	for _, size := range sizes {
		for _, limit := range limits {
			for _, known := range []bool{false, true} {
				for _, seed := range []uint64{0, 1} {
					d := fpTestReq{
						method: "POST", target: "/orders?x=1", ctype: []string{"application/json"},
						body: body[:size], knownLength: known, seed: seed, failAt: -1,
					}
					want := fpTestWant("POST", "/orders", "x=1", d.ctype, d.body, limit)
					retry, ok := fpTestRetry(t, d, limit)
					require.True(t, ok)
					require.Equal(t, want, retry, "fingerprintRequest follows the documented framing")
					for name, steps := range fpTestPatterns(size) {
						t.Run(fmt.Sprintf("size=%d/limit=%d/known=%v/seed=%d/%s", size, limit, known, seed, name), func(t *testing.T) {
							got, ok := fpTestRun(t, d, limit, steps)
							assert.True(t, ok)
							assert.Equal(t, want, got)
						})
					}
				}
			}
		}
	}
}

func TestBodyFingerprintRandomReadPatterns(t *testing.T) {
	rng := rand.New(rand.NewPCG(42, 42))
	for i := range 400 {
		size := rng.IntN(5000)
		if rng.IntN(10) == 0 {
			size = 0
		}
		body := make([]byte, size)
		for j := range body {
			body[j] = byte(rng.Uint32())
		}
		limit := int64(1 + rng.IntN(6000))
		d := fpTestReq{
			method: "PUT", target: "/a/b", ctype: []string{"text/plain"}, body: body,
			knownLength: rng.IntN(2) == 0, seed: rng.Uint64() | 1, failAt: -1,
		}
		var steps []fpTestStep
		for range rng.IntN(6) {
			switch rng.IntN(4) {
			case 0:
				steps = append(steps, fpTestStep{readAhead: true})
			case 1:
				steps = append(steps, fpTestStep{read: -1, bufSize: 1 + rng.IntN(700)})
			default:
				steps = append(steps, fpTestStep{read: rng.IntN(size + 2), bufSize: 1 + rng.IntN(700)})
			}
		}
		if rng.IntN(10) == 0 {
			steps = append(steps, fpTestStep{close: true})
		}
		t.Run(fmt.Sprintf("%d", i), func(t *testing.T) {
			retry, ok := fpTestRetry(t, d, limit)
			require.True(t, ok)
			got, ok := fpTestRun(t, d, limit, steps)
			assert.True(t, ok)
			assert.Equal(t, retry, got, "size=%d limit=%d steps=%+v", size, limit, steps)
		})
	}
}

func TestFingerprintDistinguishesRequests(t *testing.T) {
	base := fpTestReq{method: "POST", target: "/orders?a=1", ctype: []string{"application/json"}, body: []byte(`{"amount":100}`), failAt: -1}
	const limit = 1 << 20
	baseDigest, ok := fpTestRetry(t, base, limit)
	require.True(t, ok)
	variants := map[string]func(*fpTestReq){
		"method":               func(d *fpTestReq) { d.method = "PUT" },
		"path":                 func(d *fpTestReq) { d.target = "/orders/?a=1" },
		"encoded slash":        func(d *fpTestReq) { d.target = "/orders%2Fx?a=1" },
		"query":                func(d *fpTestReq) { d.target = "/orders?a=2" },
		"no query":             func(d *fpTestReq) { d.target = "/orders" },
		"content type":         func(d *fpTestReq) { d.ctype = []string{"application/json; charset=utf-8"} },
		"no content type":      func(d *fpTestReq) { d.ctype = nil },
		"two content types":    func(d *fpTestReq) { d.ctype = []string{"application/json", "application/json"} },
		"body":                 func(d *fpTestReq) { d.body = []byte(`{"amount":101}`) },
		"body prefix":          func(d *fpTestReq) { d.body = []byte(`{"amount":10`) },
		"no body":              func(d *fpTestReq) { d.body = nil },
		"path moved to query":  func(d *fpTestReq) { d.target = "/order?sa=1" },
		"query moved into ct":  func(d *fpTestReq) { d.target = "/orders"; d.ctype = []string{"a=1application/json"} },
		"body moved into ct":   func(d *fpTestReq) { d.ctype = []string{`application/json{"amount":100}`}; d.body = []byte{} },
		"ct values rearranged": func(d *fpTestReq) { d.ctype = []string{"application/", "json"} },
	}
	for name, change := range variants {
		t.Run(name, func(t *testing.T) {
			d := base
			change(&d)
			retry, ok := fpTestRetry(t, d, limit)
			require.True(t, ok)
			assert.NotEqual(t, baseDigest, retry)
			first, ok := fpTestRun(t, d, limit, []fpTestStep{{read: -1, bufSize: 4}})
			require.True(t, ok)
			assert.Equal(t, retry, first)
		})
	}
}

func TestFingerprintSameRequest(t *testing.T) {
	const limit = 16
	body := []byte("0123456789abcdef")
	base := fpTestReq{method: "POST", target: "/p", body: body, failAt: -1}
	baseDigest, ok := fpTestRetry(t, base, limit)
	require.True(t, ok)
	same := map[string]fpTestReq{
		"differs after limit":       {method: "POST", target: "/p", body: append(append([]byte{}, body...), "tail"...), failAt: -1},
		"other tail after limit":    {method: "POST", target: "/p", body: append(append([]byte{}, body...), "other tail!"...), failAt: -1},
		"chunked, in small pieces":  {method: "POST", target: "/p", body: body, seed: 9, failAt: -1},
		"declared length":           {method: "POST", target: "/p", body: body, knownLength: true, failAt: -1},
		"fails only after limit":    {method: "POST", target: "/p", body: append(append([]byte{}, body...), "xyz"...), failAt: limit + 1},
		"fails exactly at the tail": {method: "POST", target: "/p", body: append(append([]byte{}, body...), "xyz"...), failAt: limit},
	}
	for name, d := range same {
		t.Run(name, func(t *testing.T) {
			retry, ok := fpTestRetry(t, d, limit)
			require.True(t, ok)
			assert.Equal(t, baseDigest, retry)
			first, ok := fpTestRun(t, d, limit, nil)
			require.True(t, ok)
			assert.Equal(t, baseDigest, first)
			readAhead, ok := fpTestRun(t, d, limit, []fpTestStep{{readAhead: true}, {read: limit, bufSize: 5}})
			require.True(t, ok)
			assert.Equal(t, baseDigest, readAhead)
		})
	}
}

func TestFingerprintEmptyBodies(t *testing.T) {
	const limit = 1 << 20
	want := fpTestWant("POST", "/p", "", nil, nil, limit)
	noBody := fpTestReq{method: "POST", target: "/p", failAt: -1}
	empty := fpTestReq{method: "POST", target: "/p", body: []byte{}, failAt: -1}
	for name, d := range map[string]fpTestReq{"http.NoBody": noBody, "empty": empty} {
		t.Run(name, func(t *testing.T) {
			retry, ok := fpTestRetry(t, d, limit)
			require.True(t, ok)
			assert.Equal(t, want, retry)
			for _, steps := range fpTestPatterns(0) {
				first, ok := fpTestRun(t, d, limit, steps)
				require.True(t, ok)
				assert.Equal(t, want, first)
			}
		})
	}
	t.Run("nil body", func(t *testing.T) {
		r := httptest.NewRequest("POST", "/p", nil)
		r.Body = nil
		digest, ok := fingerprintRequest(r, limit)
		require.True(t, ok)
		assert.Equal(t, want, digest)
		var f bodyFingerprint
		f.init(r, limit)
		assert.Nil(t, r.Body, "a request without a body keeps it")
		f.readAhead()
		n, err := f.Read(make([]byte, 4))
		assert.Zero(t, n)
		assert.Equal(t, io.EOF, err)
		digest, ok = f.sum()
		require.True(t, ok)
		assert.Equal(t, want, digest)
	})
	t.Run("http.NoBody is kept", func(t *testing.T) {
		r := httptest.NewRequest("POST", "/p", nil)
		r.Body = http.NoBody
		var f bodyFingerprint
		f.init(r, limit)
		assert.Equal(t, http.NoBody, r.Body)
		digest, ok := f.sum()
		require.True(t, ok)
		assert.Equal(t, want, digest)
	})
}

func TestFingerprintPathIsEscapedPath(t *testing.T) {
	const limit = 1024
	for _, target := range []string{"/a%2Fb", "/a/b", "/caf%C3%A9", "/x%20y", "*"} {
		r := httptest.NewRequest("POST", "http://example.com/", nil)
		r.URL = &url.URL{}
		if target == "*" {
			r.URL.Path = "*"
		} else {
			u, err := url.ParseRequestURI(target)
			require.NoError(t, err)
			r.URL = u
		}
		digest, ok := fingerprintRequest(r, limit)
		require.True(t, ok)
		assert.Equal(t, fpTestWant("POST", r.URL.EscapedPath(), "", nil, nil, limit), digest, target)
	}
}

func TestFingerprintBodyErrors(t *testing.T) {
	const limit = 100
	body := bytes.Repeat([]byte("z"), 300)
	d := fpTestReq{method: "POST", target: "/p", body: body, failAt: 40, seed: 3}

	_, ok := fpTestRetry(t, d, limit)
	assert.False(t, ok, "retry body failing before limit")

	for name, steps := range fpTestPatterns(len(body)) {
		t.Run(name, func(t *testing.T) {
			_, ok := fpTestRun(t, d, limit, steps)
			assert.False(t, ok, "first execution body failing before limit")
		})
	}
}

func TestBodyFingerprintReadAheadKeepsError(t *testing.T) {
	body := []byte("hello, world")
	d := fpTestReq{method: "POST", target: "/p", body: body, failAt: 5}
	r, _ := fpTestNew(t, d)
	var f bodyFingerprint
	f.init(r, 1024)
	f.readAhead()
	got, err := io.ReadAll(r.Body)
	assert.Equal(t, body[:5], got, "buffered bytes come first")
	assert.ErrorIs(t, err, errFpTestBody)
	_, err = r.Body.Read(make([]byte, 1))
	assert.ErrorIs(t, err, errFpTestBody, "the error stays")
	_, ok := f.sum()
	assert.False(t, ok)
}

func TestBodyFingerprintClose(t *testing.T) {
	body := []byte("0123456789")
	d := fpTestReq{method: "POST", target: "/p", body: body, failAt: -1}
	want, ok := fpTestRetry(t, d, 8)
	require.True(t, ok)

	r, orig := fpTestNew(t, d)
	var f bodyFingerprint
	f.init(r, 8)
	f.readAhead()
	require.NoError(t, r.Body.Close())
	assert.Nil(t, f.buf, "close drops the read-ahead buffer")
	n, err := r.Body.Read(make([]byte, 4))
	assert.Zero(t, n)
	assert.ErrorIs(t, err, http.ErrBodyReadAfterClose)
	f.readAhead() // no effect after close
	assert.Nil(t, f.buf)
	assert.False(t, orig.closed)
	got, ok := f.sum()
	require.True(t, ok)
	assert.Equal(t, want, got)
}

// fpTestGenerator is a body of n bytes generated on the fly (byte i is
// i mod 251), counting the bytes it handed out.
type fpTestGenerator struct {
	n, off  int64
	pattern []byte
}

const fpTestGenChunk = 64 << 10

func (g *fpTestGenerator) Read(p []byte) (int, error) {
	if g.off >= g.n {
		return 0, io.EOF
	}
	if g.pattern == nil {
		g.pattern = make([]byte, fpTestGenChunk+251)
		for i := range g.pattern {
			g.pattern[i] = byte(i % 251)
		}
	}
	p = p[:min(int64(len(p)), g.n-g.off, fpTestGenChunk)]
	n := copy(p, g.pattern[g.off%251:])
	g.off += int64(n)
	return n, nil
}

func (g *fpTestGenerator) Close() error { return nil }

// fpTestAllocated returns the bytes allocated while fn runs.
func fpTestAllocated(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

func TestFingerprintLargeBodyBoundedMemory(t *testing.T) {
	const (
		size  = 100 << 20
		limit = 1 << 20
	)
	newReq := func(known bool) (*http.Request, *fpTestGenerator) {
		g := &fpTestGenerator{n: size}
		r := httptest.NewRequest("POST", "/upload", nil)
		r.Body = g
		r.ContentLength = -1
		if known {
			r.ContentLength = size
		}
		return r, g
	}
	var want [32]byte
	t.Run("retry reads only the first limit bytes", func(t *testing.T) {
		r, g := newReq(true)
		var ok bool
		allocated := fpTestAllocated(func() { want, ok = fingerprintRequest(r, limit) })
		require.True(t, ok)
		assert.EqualValues(t, limit, g.off)
		assert.Less(t, allocated, uint64(256<<10))
	})
	for _, known := range []bool{true, false} {
		t.Run(fmt.Sprintf("first execution, read-ahead, length known=%v", known), func(t *testing.T) {
			r, g := newReq(known)
			var f bodyFingerprint
			f.init(r, limit)
			var digest [32]byte
			var ok bool
			var read int64
			allocated := fpTestAllocated(func() {
				f.readAhead()
				assert.EqualValues(t, limit, g.off, "read ahead exactly limit bytes")
				assert.LessOrEqual(t, cap(f.buf), limit)
				var err error
				read, err = io.Copy(io.Discard, r.Body)
				require.NoError(t, err)
				digest, ok = f.sum()
			})
			require.True(t, ok)
			assert.EqualValues(t, size, read)
			assert.Equal(t, want, digest)
			assert.Less(t, allocated, uint64(3*limit), "at most about limit bytes held, never the body")
		})
	}
	t.Run("first execution, handler reads nothing", func(t *testing.T) {
		r, g := newReq(false)
		var f bodyFingerprint
		f.init(r, limit)
		var digest [32]byte
		var ok bool
		allocated := fpTestAllocated(func() { digest, ok = f.sum() })
		require.True(t, ok)
		assert.EqualValues(t, limit, g.off)
		assert.Equal(t, want, digest)
		assert.Less(t, allocated, uint64(256<<10))
	})
}

func TestBodyFingerprintReadAheadSizesBufferFromLength(t *testing.T) {
	body := bytes.Repeat([]byte("b"), 5000)
	d := fpTestReq{method: "POST", target: "/p", body: body, knownLength: true, failAt: -1}
	r, _ := fpTestNew(t, d)
	var f bodyFingerprint
	f.init(r, 1<<20)
	f.readAhead()
	assert.Len(t, f.buf, len(body))
	assert.LessOrEqual(t, cap(f.buf), len(body)+fpInlineSize, "one exact allocation, not the limit")
	got, err := io.ReadAll(r.Body)
	require.NoError(t, err)
	assert.Equal(t, body, got)
}

func TestFingerprintAllocations(t *testing.T) {
	body := strings.Repeat("x", 300)
	r := httptest.NewRequest("POST", "/orders?a=1", nil)
	r.Header.Set("Content-Type", "application/json")
	rd := strings.NewReader(body)
	rc := io.NopCloser(rd)
	// sync.Pool drops items at random under the race detector, so the
	// bound leaves room for that; without it both paths allocate nothing.
	t.Run("retry", func(t *testing.T) {
		allocs := testing.AllocsPerRun(200, func() {
			rd.Reset(body)
			r.Body = rc
			if _, ok := fingerprintRequest(r, 1<<20); !ok {
				t.Fatal("body failed")
			}
		})
		assert.LessOrEqual(t, allocs, 1.0)
	})
	t.Run("first execution", func(t *testing.T) {
		var f bodyFingerprint
		buf := make([]byte, 128)
		allocs := testing.AllocsPerRun(200, func() {
			rd.Reset(body)
			r.Body = rc
			f.init(r, 1<<20)
			for {
				if _, err := r.Body.Read(buf); err != nil {
					break
				}
			}
			if _, ok := f.sum(); !ok {
				t.Fatal("body failed")
			}
			f.reset()
		})
		assert.LessOrEqual(t, allocs, 1.0)
	})
	t.Run("first execution with read-ahead", func(t *testing.T) {
		var f bodyFingerprint
		allocs := testing.AllocsPerRun(200, func() {
			rd.Reset(body)
			r.Body = rc
			f.init(r, 1<<20)
			f.readAhead()
			if _, ok := f.sum(); !ok {
				t.Fatal("body failed")
			}
			f.reset()
		})
		assert.LessOrEqual(t, allocs, 1.0, "a small body fits the inline buffer")
	})
}

func TestBodyFingerprintOnServer(t *testing.T) {
	const limit = 64 << 10
	body := bytes.Repeat([]byte("0123456789"), 50_000) // 500 kB, beyond limit
	type result struct {
		first [32]byte
		ok    bool
		read  int
	}
	results := make(chan result, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var f bodyFingerprint
		f.init(r, limit)
		defer f.reset()
		// Read a little, read ahead as the middleware does before the
		// header goes out, answer, then finish reading.
		head := make([]byte, 10)
		_, err := io.ReadFull(r.Body, head)
		assert.NoError(t, err)
		f.readAhead()
		w.WriteHeader(http.StatusCreated)
		rest, _ := io.ReadAll(r.Body)
		digest, ok := f.sum()
		results <- result{first: digest, ok: ok, read: len(head) + len(rest)}
	}))
	t.Cleanup(srv.Close)

	resp, err := http.Post(srv.URL+"/orders?q=1", "application/octet-stream", bytes.NewReader(body))
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	require.NoError(t, resp.Body.Close())
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	res := <-results
	require.True(t, res.ok)
	assert.GreaterOrEqual(t, res.read, limit, "the handler got at least the read-ahead bytes")
	want := fpTestWant("POST", "/orders", "q=1", []string{"application/octet-stream"}, body, limit)
	assert.Equal(t, want, res.first)
}

func FuzzBodyFingerprint(f *testing.F) {
	f.Add([]byte("hello"), uint16(3), uint64(1), []byte{0, 1, 2})
	f.Add([]byte{}, uint16(1), uint64(2), []byte{1})
	f.Add(bytes.Repeat([]byte("ab"), 700), uint16(600), uint64(3), []byte{2, 0, 3, 1, 0})
	f.Fuzz(func(t *testing.T, body []byte, limit uint16, seed uint64, ops []byte) {
		if limit == 0 || len(ops) > 32 {
			t.Skip()
		}
		d := fpTestReq{method: "POST", target: "/f", body: body, seed: seed | 1, knownLength: seed%2 == 0, failAt: -1}
		var steps []fpTestStep
		for i, op := range ops {
			switch op % 4 {
			case 0:
				steps = append(steps, fpTestStep{readAhead: true})
			case 1:
				steps = append(steps, fpTestStep{read: -1, bufSize: 1 + i})
			case 2:
				steps = append(steps, fpTestStep{read: int(op), bufSize: 1 + int(op)%13})
			case 3:
				steps = append(steps, fpTestStep{close: true})
			}
		}
		want := fpTestWant("POST", "/f", "", nil, body, int64(limit))
		retry, ok := fpTestRetry(t, d, int64(limit))
		if !ok || retry != want {
			t.Fatalf("fingerprintRequest: ok=%v, digest mismatch=%v", ok, retry != want)
		}
		got, ok := fpTestRun(t, d, int64(limit), steps)
		if !ok || got != want {
			t.Fatalf("bodyFingerprint with %+v: ok=%v, digest mismatch=%v", steps, ok, got != want)
		}
	})
}
