package idempotency

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNormalPath(t *testing.T) {
	forms := []struct {
		name, in, want string
	}{
		{"plain", "/orders/1", "/orders/1"},
		{"lower hex digits", "/a%2fb", "/a%2Fb"},
		{"upper hex digits", "/a%2Fb", "/a%2Fb"},
		{"tilde decoded", "/%7Euser", "/~user"},
		{"tilde in lower hex decoded", "/%7euser", "/~user"},
		{"letter decoded", "/a%41", "/aA"},
		{"digit, dash, dot, underscore decoded", "/%30%2D%2E%5F", "/0-._"},
		{"space stays escaped", "/a%20b", "/a%20b"},
		{"non-ASCII stays escaped", "/caf%c3%a9", "/caf%C3%A9"},
		{"percent alone", "/a%", "/a%"},
		{"one hex digit", "/a%4", "/a%4"},
		{"not hex", "/a%zz", "/a%zz"},
		{"half hex", "/a%4z", "/a%4z"},
		{"escaped percent", "/a%25", "/a%25"},
		{"malformed then valid", "/%%41", "/%A"},
		{"empty", "", ""},
	}
	for _, tc := range forms {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, normalPath(tc.in))
		})
	}

	pairs := []struct {
		name, a, b string
		same       bool
	}{
		{"hex case", "/a%2fb", "/a%2Fb", true},
		{"unreserved tilde", "/%7Euser", "/~user", true},
		{"unreserved letter", "/a%41", "/aA", true},
		{"escaped slash is not a slash", "/a%2Fb", "/a/b", false},
		{"escaped space is not a plus", "/a%20b", "/a+b", false},
		{"different letters", "/a%41", "/aa", false},
	}
	for _, tc := range pairs {
		t.Run("pair/"+tc.name, func(t *testing.T) {
			if tc.same {
				assert.Equal(t, normalPath(tc.a), normalPath(tc.b))
			} else {
				assert.NotEqual(t, normalPath(tc.a), normalPath(tc.b))
			}
		})
	}

	t.Run("normal path does not allocate", func(t *testing.T) {
		var got string
		allocs := testing.AllocsPerRun(100, func() { got = normalPath("/orders/1") })
		assert.Zero(t, allocs)
		assert.Equal(t, "/orders/1", got)
	})
}

func TestNormalMediaType(t *testing.T) {
	forms := []struct {
		name, in, want string
	}{
		{"plain", "application/json", "application/json"},
		{"type case", "Application/JSON", "application/json"},
		{"charset value case", "application/json;charset=UTF-8", "application/json;charset=utf-8"},
		{"space after semicolon", "application/json; charset=utf-8", "application/json;charset=utf-8"},
		{"quoted charset, name case, spaces", `application/json ; Charset="utf-8"`, "application/json;charset=utf-8"},
		{"tab", "text/plain;\tcharset=utf-8", "text/plain;charset=utf-8"},
		{"other parameter value keeps case", "text/plain; format=Flowed", "text/plain;format=Flowed"},
		{"empty", "", ""},
	}
	for _, tc := range forms {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, normalMediaType(tc.in))
		})
	}

	pairs := []struct {
		name, a, b string
		same       bool
	}{
		{"type case", "application/json", "Application/JSON", true},
		{"charset case and spaces", "application/json; charset=utf-8", "application/json;charset=UTF-8", true},
		{"charset quoted", "application/json; charset=utf-8", `application/json ; Charset="utf-8"`, true},
		{"parameter name case", "text/plain; Format=flowed", "text/plain;format=flowed", true},
		{"other parameter values keep case", "text/plain; format=flowed", "text/plain; format=Flowed", false},
		{"different charset", "text/plain; charset=utf-8", "text/plain; charset=latin1", false},
		{"parameter or none", "application/json", "application/json; charset=utf-8", false},
		{"different type", "application/json", "text/json", false},
	}
	for _, tc := range pairs {
		t.Run("pair/"+tc.name, func(t *testing.T) {
			if tc.same {
				assert.Equal(t, normalMediaType(tc.a), normalMediaType(tc.b))
			} else {
				assert.NotEqual(t, normalMediaType(tc.a), normalMediaType(tc.b))
			}
		})
	}

	t.Run("normal value does not allocate", func(t *testing.T) {
		var got string
		allocs := testing.AllocsPerRun(100, func() { got = normalMediaType("application/json") })
		assert.Zero(t, allocs)
		assert.Equal(t, "application/json", got)
	})
}

// fptLegacyStore is a memory store that answers the claim of one storage
// key with a completed record written under the previous fingerprint rule.
type fptLegacyStore struct {
	*MemoryStore
	skey string
	fp   []byte
}

func (s *fptLegacyStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*Record, error) {
	if key != s.skey {
		return s.MemoryStore.Claim(ctx, key, token, lease)
	}
	return &Record{
		State:       StateCompleted,
		Token:       "legacy-owner",
		Fingerprint: s.fp,
		Response: Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Content-Type": {"application/json"}},
			Body:       []byte(`{"id":7}`),
		},
	}, nil
}

func TestLegacyFingerprintVectors(t *testing.T) {
	vectors := []struct {
		name, method, target, ctype, body, want string
	}{
		{"json body", http.MethodPost, "/orders", "application/json", `{"item":"book"}`,
			"2894432a1da511c37496b8e2b0bc31a8addbd308812b82bd9510da24e5329366"},
		{"escaped path and query, empty body", http.MethodPut, "/a%2Fb?x=1&y=2", "", "",
			"b22be2ff16f06594c9c85fb33b3faf2a2f384481333e7da83ae93abf858ade51"},
		{"longer text body", http.MethodPatch, "/orders/7", "text/plain; charset=utf-8", strings.Repeat("z", 3000),
			"8b367e5d7b6a1feb70e93bebaeb9e5f0783fc509b52622003f95c2294eb91f49"},
	}
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			r := httptest.NewRequest(v.method, v.target, strings.NewReader(v.body))
			if v.ctype != "" {
				r.Header.Set("Content-Type", v.ctype)
			}
			assert.Equal(t, v.want, hex.EncodeToString(legacyFingerprint(r, 1<<20)))
		})
	}

	digest, err := hex.DecodeString(vectors[0].want)
	require.NoError(t, err)
	const key = "legacy-key-K"
	newRequest := func(body string) *http.Request {
		r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Idempotency-Key", key)
		return r
	}
	cases := []struct {
		name       string
		fp         []byte
		body       string
		wantStatus int
	}{
		{"identical retry replays", digest, `{"item":"book"}`, http.StatusCreated},
		{"other body is refused", digest, `{"item":"pen"}`, http.StatusUnprocessableEntity},
		{"unreadable-body record never matches", append(bytes.Clone(digest), 0xff), `{"item":"book"}`, http.StatusUnprocessableEntity},
	}
	for _, tc := range cases {
		t.Run("middleware/"+tc.name, func(t *testing.T) {
			mem := NewMemoryStore()
			t.Cleanup(func() { mem.Close() })
			st := &fptLegacyStore{MemoryStore: mem, skey: StorageKey("", key), fp: tc.fp}
			ran := false
			h := New(Config{Store: st})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ran = true
				w.WriteHeader(http.StatusAccepted)
			}))
			w := httptest.NewRecorder()
			h.ServeHTTP(w, newRequest(tc.body))
			assert.False(t, ran, "the handler must not run for a completed key")
			assert.Equal(t, tc.wantStatus, w.Code)
			if tc.wantStatus == http.StatusCreated {
				assert.Equal(t, "true", w.Header().Get(ReplayedHeader))
				assert.Equal(t, `{"id":7}`, w.Body.String())
			} else {
				assert.Empty(t, w.Header().Get(ReplayedHeader))
			}
		})
	}
}

// fptReq describes a request of the fingerprint tests. Zero fields take
// defaults: POST, /orders, no Content-Type, an empty body of known length.
type fptReq struct {
	method, target, ctype, body string
	noBody                      bool // Body is http.NoBody
	unknownLen                  bool // ContentLength is -1
}

func (q fptReq) build() *http.Request {
	method, target := q.method, q.target
	if method == "" {
		method = http.MethodPost
	}
	if target == "" {
		target = "/orders"
	}
	r := httptest.NewRequest(method, target, nil)
	if q.ctype != "" {
		r.Header.Set("Content-Type", q.ctype)
	}
	switch {
	case q.noBody:
		r.Body, r.ContentLength = http.NoBody, 0
	case q.unknownLen:
		// The reader's type hidden, so nothing learns its length: as a
		// chunked body.
		r.Body, r.ContentLength = io.NopCloser(struct{ io.Reader }{strings.NewReader(q.body)}), -1
	default:
		r.Body, r.ContentLength = io.NopCloser(strings.NewReader(q.body)), int64(len(q.body))
	}
	return r
}

// fptRead is how a handler reads its request body: chunk bytes at a time,
// upTo bytes in all (-1: until the body ends), then Close when close is set.
type fptRead struct {
	chunk int
	upTo  int
	close bool
}

var (
	fptReadAll     = fptRead{chunk: 512, upTo: -1}
	fptReadNothing = fptRead{upTo: 0}
	fptCloseOnly   = fptRead{upTo: 0, close: true}
)

func fptReadAllIn(chunk int) fptRead { return fptRead{chunk: chunk, upTo: -1} }
func fptReadFirst(k int) fptRead     { return fptRead{chunk: 3, upTo: k} }

// consume reads body as the handler of p would. It returns the bytes read.
func (p fptRead) consume(t testing.TB, body io.ReadCloser) int {
	t.Helper()
	buf := make([]byte, max(p.chunk, 1))
	read := 0
	for p.upTo < 0 || read < p.upTo {
		want := len(buf)
		if p.upTo >= 0 {
			want = min(want, p.upTo-read)
		}
		n, err := body.Read(buf[:want])
		read += n
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
	}
	if p.close {
		require.NoError(t, body.Close())
	}
	return read
}

// fptRecord returns the fingerprint the middleware stores for r when its
// handler reads as p says, set up the way a first execution sets it up.
func fptRecord(t testing.TB, r *http.Request, p fptRead, limit int64) []byte {
	t.Helper()
	if r.Body == nil || r.Body == http.NoBody {
		return emptyBodyFingerprint(r)
	}
	b := fptRecorder(r, r.Body, r.ContentLength, limit)
	p.consume(t, b)
	return b.seal()
}

func TestFingerprintMatch(t *testing.T) {
	const body = "abcdefgh"
	cases := []struct {
		name  string
		orig  fptReq
		read  fptRead
		limit int64 // 0: 1 MiB
		retry fptReq
		match bool
	}{
		{name: "identical", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{body: body}, match: true},
		{name: "identical, read a byte at a time", orig: fptReq{body: body}, read: fptReadAllIn(1), retry: fptReq{body: body}, match: true},
		{name: "identical, retry of unknown length", orig: fptReq{body: body}, read: fptReadAllIn(5), retry: fptReq{body: body, unknownLen: true}, match: true},
		{name: "identical, original of unknown length", orig: fptReq{body: body, unknownLen: true}, read: fptReadAll, retry: fptReq{body: body}, match: true},
		{name: "identical, both of unknown length", orig: fptReq{body: body, unknownLen: true}, read: fptReadAll, retry: fptReq{body: body, unknownLen: true}, match: true},
		{name: "identical with content type", orig: fptReq{ctype: "application/json", body: `{"a":1}`}, read: fptReadAll, retry: fptReq{ctype: "application/json", body: `{"a":1}`}, match: true},

		{name: "read to the end, retry longer", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{body: body + "i"}, match: false},
		{name: "read to the end, retry longer of unknown length", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{body: body + "i", unknownLen: true}, match: false},
		{name: "read to the end of unknown length, retry longer", orig: fptReq{body: body, unknownLen: true}, read: fptReadAll, retry: fptReq{body: body + "i"}, match: false},
		{name: "read to the end of unknown length, retry longer of unknown length", orig: fptReq{body: body, unknownLen: true}, read: fptReadAll, retry: fptReq{body: body + "i", unknownLen: true}, match: false},
		{name: "read to the end, retry shorter", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{body: body[:7]}, match: false},
		{name: "read to the end, retry shorter of unknown length", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{body: body[:7], unknownLen: true}, match: false},
		{name: "read to the end, retry differs in the last byte", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{body: "abcdefgX"}, match: false},

		{name: "read 4, retry differs after 4", orig: fptReq{body: body}, read: fptReadFirst(4), retry: fptReq{body: "abcdXXXX"}, match: true},
		{name: "read 4, retry longer after 4", orig: fptReq{body: body}, read: fptReadFirst(4), retry: fptReq{body: "abcdXXXXXXXXXXXX", unknownLen: true}, match: true},
		{name: "read 4, retry ends at 4", orig: fptReq{body: body}, read: fptReadFirst(4), retry: fptReq{body: "abcd"}, match: true},
		{name: "read 4, retry differs before 4", orig: fptReq{body: body}, read: fptReadFirst(4), retry: fptReq{body: "abXdefgh"}, match: false},
		{name: "read 4, retry differs at 4th byte", orig: fptReq{body: body}, read: fptReadFirst(4), retry: fptReq{body: "abcXefgh"}, match: false},
		{name: "read 4, retry shorter than 4", orig: fptReq{body: body}, read: fptReadFirst(4), retry: fptReq{body: "abc"}, match: false},
		{name: "read 4, retry shorter than 4 of unknown length", orig: fptReq{body: body}, read: fptReadFirst(4), retry: fptReq{body: "abc", unknownLen: true}, match: false},
		{name: "read all its known length without EOF, retry longer", orig: fptReq{body: body}, read: fptReadFirst(len(body)), retry: fptReq{body: body + "i", unknownLen: true}, match: false},
		{name: "read all its unknown length without EOF, retry longer", orig: fptReq{body: body, unknownLen: true}, read: fptReadFirst(len(body)), retry: fptReq{body: body + "i"}, match: true},

		{name: "read nothing, retry with another body", orig: fptReq{body: body}, read: fptReadNothing, retry: fptReq{body: "something else entirely"}, match: true},
		{name: "read nothing, retry empty", orig: fptReq{body: body}, read: fptReadNothing, retry: fptReq{}, match: true},
		{name: "closed unread, retry with another body", orig: fptReq{body: body}, read: fptCloseOnly, retry: fptReq{body: "xyz", unknownLen: true}, match: true},

		{name: "differs after the limit", orig: fptReq{body: body}, read: fptReadAll, limit: 4, retry: fptReq{body: "abcdXXXX"}, match: true},
		{name: "longer after the limit", orig: fptReq{body: body}, read: fptReadAll, limit: 4, retry: fptReq{body: "abcdXXXXXXXXXX"}, match: true},
		{name: "longer after the limit, unknown length", orig: fptReq{body: body, unknownLen: true}, read: fptReadAll, limit: 4, retry: fptReq{body: "abcdXXXXXXXXXX", unknownLen: true}, match: true},
		{name: "shorter after the limit", orig: fptReq{body: body}, read: fptReadAll, limit: 4, retry: fptReq{body: "abcd"}, match: true},
		{name: "differs before the limit", orig: fptReq{body: body}, read: fptReadAll, limit: 4, retry: fptReq{body: "abcXefgh"}, match: false},
		{name: "body of exactly the limit, retry longer", orig: fptReq{body: body}, read: fptReadAll, limit: 8, retry: fptReq{body: body + "i"}, match: false},
		{name: "body of exactly the limit, retry longer of unknown length", orig: fptReq{body: body, unknownLen: true}, read: fptReadAll, limit: 8, retry: fptReq{body: body + "i", unknownLen: true}, match: false},

		{name: "no body, retry without body", orig: fptReq{noBody: true}, retry: fptReq{noBody: true}, match: true},
		{name: "no body, retry with an empty body", orig: fptReq{noBody: true}, retry: fptReq{}, match: true},
		{name: "no body, retry with an empty body of unknown length", orig: fptReq{noBody: true}, retry: fptReq{unknownLen: true}, match: true},
		{name: "no body, retry with a body", orig: fptReq{noBody: true}, retry: fptReq{body: "x"}, match: false},
		{name: "no body, retry with a body of unknown length", orig: fptReq{noBody: true}, retry: fptReq{body: "x", unknownLen: true}, match: false},
		{name: "empty body read to its end, retry with a body", orig: fptReq{}, read: fptReadAll, retry: fptReq{body: "x"}, match: false},
		{name: "empty body read to its end, retry with a body of unknown length", orig: fptReq{}, read: fptReadAll, retry: fptReq{body: "x", unknownLen: true}, match: false},
		// An HTTP/2 request without a body has an open body of length 0,
		// not http.NoBody: its handler need not read it to be at its end.
		{name: "empty body of known length left unread, retry with a body", orig: fptReq{}, read: fptReadNothing, retry: fptReq{body: "x"}, match: false},
		{name: "empty body of known length left unread, retry with a body of unknown length", orig: fptReq{}, read: fptReadNothing, retry: fptReq{body: "x", unknownLen: true}, match: false},

		{name: "method differs", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{method: http.MethodPut, body: body}, match: false},
		{name: "path differs", orig: fptReq{target: "/orders/1", body: body}, read: fptReadAll, retry: fptReq{target: "/orders/2", body: body}, match: false},
		{name: "query differs", orig: fptReq{target: "/orders?a=1", body: body}, read: fptReadAll, retry: fptReq{target: "/orders?a=2", body: body}, match: false},
		{name: "query order differs", orig: fptReq{target: "/orders?a=1&b=2", body: body}, read: fptReadAll, retry: fptReq{target: "/orders?b=2&a=1", body: body}, match: false},
		{name: "empty query is no query", orig: fptReq{target: "/orders", body: body}, read: fptReadAll, retry: fptReq{target: "/orders?", body: body}, match: true},
		{name: "content type differs", orig: fptReq{ctype: "application/json", body: body}, read: fptReadAll, retry: fptReq{ctype: "text/plain", body: body}, match: false},
		{name: "content type added", orig: fptReq{body: body}, read: fptReadAll, retry: fptReq{ctype: "text/plain", body: body}, match: false},
		{name: "method differs, no body", orig: fptReq{noBody: true}, retry: fptReq{method: http.MethodPatch, noBody: true}, match: false},
		{name: "path differs, body unread", orig: fptReq{target: "/a", body: body}, read: fptReadNothing, retry: fptReq{target: "/b", body: body}, match: false},

		{name: "path hex case", orig: fptReq{target: "/a%2fb", body: body}, read: fptReadAll, retry: fptReq{target: "/a%2Fb", body: body}, match: true},
		{name: "path unreserved tilde", orig: fptReq{target: "/%7Euser", body: body}, read: fptReadAll, retry: fptReq{target: "/~user", body: body}, match: true},
		{name: "path unreserved letter", orig: fptReq{target: "/a%41", body: body}, read: fptReadAll, retry: fptReq{target: "/aA", body: body}, match: true},
		{name: "path escaped slash", orig: fptReq{target: "/a%2Fb", body: body}, read: fptReadAll, retry: fptReq{target: "/a/b", body: body}, match: false},
		{name: "media type case", orig: fptReq{ctype: "application/json", body: body}, read: fptReadAll, retry: fptReq{ctype: "Application/JSON", body: body}, match: true},
		{name: "charset case and spaces", orig: fptReq{ctype: "application/json; charset=utf-8", body: body}, read: fptReadAll, retry: fptReq{ctype: "application/json;charset=UTF-8", body: body}, match: true},
		{name: "charset quoted", orig: fptReq{ctype: "application/json;charset=UTF-8", body: body}, read: fptReadAll, retry: fptReq{ctype: `application/json ; Charset="utf-8"`, body: body}, match: true},
		{name: "other parameter value case", orig: fptReq{ctype: "text/plain; format=flowed", body: body}, read: fptReadAll, retry: fptReq{ctype: "text/plain; format=Flowed", body: body}, match: false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			limit := tc.limit
			if limit == 0 {
				limit = 1 << 20
			}
			fp := fptRecord(t, tc.orig.build(), tc.read, limit)
			require.Len(t, fp, fpLen)
			got := matchFingerprint(httptest.NewRecorder(), tc.retry.build(), fp, limit, time.Second)
			assert.Equal(t, tc.match, got)
		})
	}
}

// fptScriptedBody answers each Read with the next step of its script: that
// many 'q' bytes (at most len(p)) and the step's error. Past the script it
// returns errFptScriptDone.
type fptScriptedBody struct {
	steps []fptStep
}

type fptStep struct {
	n   int // bytes to return; -1: one more than asked for
	err error
}

var errFptScriptDone = errors.New("read past the end of the script")

func (b *fptScriptedBody) Read(p []byte) (int, error) {
	if len(b.steps) == 0 {
		return 0, errFptScriptDone
	}
	s := b.steps[0]
	b.steps = b.steps[1:]
	if s.n < 0 {
		return len(p) + 1, s.err
	}
	n := min(s.n, len(p))
	for i := range p[:n] {
		p[i] = 'q'
	}
	return n, s.err
}

func (b *fptScriptedBody) Close() error { return nil }

func TestBodyRecorderFailedRead(t *testing.T) {
	boom := errors.New("connection reset")
	cases := []struct {
		name           string
		steps          []fptStep
		length         int64
		reads          int // how many Reads the handler makes
		wantN          int64
		wantEnd, wantF bool
	}{
		{name: "10 bytes then an error, unknown length",
			steps: []fptStep{{n: 10}, {err: boom}}, length: -1, reads: 2, wantN: 10, wantF: true},
		{name: "10 bytes then an error, declared 20",
			steps: []fptStep{{n: 10}, {err: boom}}, length: 20, reads: 2, wantN: 10, wantF: true},
		{name: "10 bytes with an error",
			steps: []fptStep{{n: 10, err: boom}}, length: -1, reads: 1, wantN: 10, wantF: true},
		{name: "impossible count",
			steps: []fptStep{{n: 4}, {n: -1}}, length: -1, reads: 2, wantN: 4, wantF: true},
		{name: "known length read whole, no EOF",
			steps: []fptStep{{n: 10}, {n: 6}}, length: 16, reads: 2, wantN: 16, wantEnd: true},
		{name: "known length read whole in one read, no EOF",
			steps: []fptStep{{n: 16}}, length: 16, reads: 1, wantN: 16, wantEnd: true},
		{name: "known length read in part",
			steps: []fptStep{{n: 10}}, length: 16, reads: 1, wantN: 10},
		{name: "unknown length, bytes with EOF",
			steps: []fptStep{{n: 10, err: io.EOF}}, length: -1, reads: 1, wantN: 10, wantEnd: true},
		{name: "unknown length, no EOF yet",
			steps: []fptStep{{n: 10}}, length: -1, reads: 1, wantN: 10},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/upload", nil)
			b := fptRecorder(r, &fptScriptedBody{steps: tc.steps}, tc.length, 1<<20)
			buf := make([]byte, 64)
			for range tc.reads {
				_, _ = b.Read(buf)
			}
			assert.Equal(t, tc.wantN, b.n)
			assert.Equal(t, tc.wantF, b.failed, "failed")
			assert.Equal(t, tc.wantEnd, b.reachedEnd, "reachedEnd")
			fp := b.seal()
			require.Len(t, fp, fpLen)
			assert.Equal(t, uint64(tc.wantN), binary.BigEndian.Uint64(fp[1+sha256.Size:]), "recorded length")
			assert.Equal(t, tc.wantEnd, fp[fpLen-1]&fpReachedEnd != 0, "recorded end")
		})
	}
}

// fptGateBody reports each Read it enters on entered before it passes the
// call on.
type fptGateBody struct {
	io.Reader
	entered chan struct{}
}

func (b *fptGateBody) Read(p []byte) (int, error) {
	b.entered <- struct{}{}
	return b.Reader.Read(p)
}

func (b *fptGateBody) Close() error { return nil }

func TestBodyRecorderSealDoesNotWaitForARead(t *testing.T) {
	pr, pw := io.Pipe()
	body := &fptGateBody{Reader: io.MultiReader(strings.NewReader("hello"), pr), entered: make(chan struct{}, 2)}
	r := httptest.NewRequest(http.MethodPost, "/upload", nil)
	b := fptRecorder(r, body, -1, 1<<20)

	buf := make([]byte, 16)
	n, err := b.Read(buf)
	require.NoError(t, err)
	require.Equal(t, "hello", string(buf[:n]))
	<-body.entered

	type result struct {
		n   int
		err error
	}
	late := make(chan result, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		p := make([]byte, 16)
		n, err := b.Read(p)
		late <- result{n, err}
	}()
	t.Cleanup(func() {
		pw.CloseWithError(errors.New("test over"))
		wg.Wait()
	})
	<-body.entered // the goroutine is in Read, about to block on the pipe

	sealed := make(chan []byte, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		sealed <- b.seal()
	}()
	var fp []byte
	select {
	case fp = <-sealed:
	case <-time.After(time.Second):
		t.Fatal("seal waited for a Read blocked on the body")
	}
	assert.Equal(t, fptWantSeal(r, "hello", false), fp, "seal covers the bytes read before it")

	_, err = pw.Write([]byte("late bytes"))
	require.NoError(t, err)
	res := <-late
	assert.NoError(t, res.err)
	assert.Equal(t, len("late bytes"), res.n, "the late Read still delivers its bytes")
	assert.Equal(t, fp, b.seal(), "bytes read after seal changed the fingerprint")
	assert.Equal(t, int64(len("hello")), b.n, "bytes read after seal were counted")
}

// fptWantSeal is the fingerprint of r when the handler read body, built
// from the format's parts.
func fptWantSeal(r *http.Request, body string, reachedEnd bool) []byte {
	msg := append(appendFields(nil, r), body...)
	return fpSeal(sha256.Sum256(msg), int64(len(body)), reachedEnd)
}

// fptRecorder returns a bodyRecorder for r's fields over body, set up as
// the middleware sets one up.
func fptRecorder(r *http.Request, body io.ReadCloser, length, limit int64) *bodyRecorder {
	b := &bodyRecorder{body: body, length: length, limit: limit}
	b.hash.buf = appendFields(make([]byte, 0, fpSmall), r)
	return b
}

// fptSizedBody is a body of size bytes, all 'x', made as it is read; it
// counts the bytes it returned.
type fptSizedBody struct {
	size, read int64
}

func (b *fptSizedBody) Read(p []byte) (int, error) {
	if b.read >= b.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), b.size-b.read))
	for i := range p[:n] {
		p[i] = 'x'
	}
	b.read += int64(n)
	return n, nil
}

func (b *fptSizedBody) Close() error { return nil }

func TestReplayCheckReadsBoundedBytes(t *testing.T) {
	const kib, huge = 1 << 10, 100 << 20
	cases := []struct {
		name     string
		origBody string
		read     fptRead
		retryLen int64 // the retry's declared length; -1: unknown
		match    bool
	}{
		{"original read 1 KiB to its end, retry of unknown length", strings.Repeat("x", kib), fptReadAllIn(100), -1, false},
		{"original read 1 KiB to its end, retry of known length", strings.Repeat("x", kib), fptReadAllIn(100), huge, false},
		{"original read 1 KiB of a longer body, retry of unknown length", strings.Repeat("x", 4*kib), fptRead{chunk: 100, upTo: kib}, -1, true},
		{"original read 1 KiB of a longer body, retry of known length", strings.Repeat("x", 4*kib), fptRead{chunk: 100, upTo: kib}, huge, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fp := fptRecord(t, fptReq{body: tc.origBody}.build(), tc.read, 1<<20)
			retry := httptest.NewRequest(http.MethodPost, "/orders", nil)
			body := &fptSizedBody{size: huge}
			retry.Body, retry.ContentLength = body, tc.retryLen
			assert.Equal(t, tc.match, matchFingerprint(httptest.NewRecorder(), retry, fp, 1<<20, time.Second))
			assert.LessOrEqual(t, body.read, int64(kib+1), "bytes read from the retry's body")
			assert.GreaterOrEqual(t, body.read, int64(kib), "bytes read from the retry's body")
		})
	}
}

// TestFingerprintRequestWithoutBody runs a request without a body, then
// retries it with a body: that is another request, over HTTP/1.1 (where the
// handler gets http.NoBody) as over HTTP/2 (where it gets an open body of
// length 0 that it need not read).
func TestFingerprintRequestWithoutBody(t *testing.T) {
	for _, proto := range []struct {
		name  string
		major int
	}{{"HTTP/1.1", 1}, {"HTTP/2", 2}} {
		t.Run(proto.name, func(t *testing.T) {
			h := New(Config{})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusCreated)
				_, _ = io.WriteString(w, "created")
			}))
			srv := httptest.NewUnstartedServer(h)
			srv.EnableHTTP2 = proto.major == 2
			srv.StartTLS()
			t.Cleanup(srv.Close)
			client := srv.Client()

			send := func(body io.Reader) (int, string) {
				t.Helper()
				req, err := http.NewRequest(http.MethodPost, srv.URL+"/orders", body)
				require.NoError(t, err)
				req.Header.Set("Idempotency-Key", "no-body")
				resp, err := client.Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				_, _ = io.Copy(io.Discard, resp.Body)
				require.Equal(t, proto.major, resp.ProtoMajor)
				return resp.StatusCode, resp.Header.Get(ReplayedHeader)
			}
			status, _ := send(nil)
			require.Equal(t, http.StatusCreated, status)
			status, replayed := send(nil)
			assert.Equal(t, http.StatusCreated, status, "identical retry")
			assert.Equal(t, "true", replayed, "identical retry")
			status, _ = send(strings.NewReader("x"))
			assert.Equal(t, http.StatusUnprocessableEntity, status, "retry with a body")
		})
	}
}

// FuzzBodyFingerprint checks the body part of the fingerprint against its
// definition. The handler reads stop bytes of body in reads of chunk bytes
// (to the body's end, until io.EOF, when stop >= len(body)). The record then
// covers L = min(read, limit) bytes and says the body ended there when it
// was read to its end within the limit. A retry of the same method, path and
// Content-Type matches exactly when its first L bytes are the original's and,
// if the record says the body ended, it is as long as L. So:
//
//   - the identical retry matches;
//   - a retry with the byte at flip changed (same length) matches iff
//     flip >= L: the end check always holds at the same length;
//   - a retry one byte longer matches iff the record does not say the body
//     ended;
//   - a retry one byte shorter matches iff it still holds L bytes (then the
//     body was not read to its end, or L would be its length).
//
// Each retry is checked with its length declared and with it unknown.
func FuzzBodyFingerprint(f *testing.F) {
	f.Add([]byte("hello, world"), uint16(1<<10), uint8(4), uint16(100), true, uint16(3))
	f.Add([]byte("hello, world"), uint16(1<<10), uint8(4), uint16(5), false, uint16(7))
	f.Add([]byte("hello, world"), uint16(1<<10), uint8(4), uint16(5), true, uint16(4))
	f.Add([]byte("hello, world"), uint16(5), uint8(3), uint16(100), false, uint16(5))
	f.Add([]byte("hello, world"), uint16(5), uint8(3), uint16(100), true, uint16(4))
	f.Add([]byte("hello, world"), uint16(12), uint8(1), uint16(12), false, uint16(11))
	f.Add([]byte("hello, world"), uint16(1), uint8(255), uint16(0), true, uint16(0))
	f.Add([]byte("x"), uint16(1), uint8(1), uint16(1), false, uint16(0))
	f.Add([]byte{}, uint16(1), uint8(1), uint16(0), true, uint16(0))
	f.Add([]byte{}, uint16(7), uint8(2), uint16(0), false, uint16(9))
	f.Add(bytes.Repeat([]byte{0, 0xff}, 300), uint16(512), uint8(64), uint16(600), true, uint16(511))
	f.Add(bytes.Repeat([]byte{0, 0xff}, 300), uint16(512), uint8(64), uint16(600), false, uint16(512))
	f.Add(bytes.Repeat([]byte("ab"), 300), uint16(1000), uint8(7), uint16(299), true, uint16(298))
	f.Fuzz(func(t *testing.T, body []byte, limit uint16, chunk uint8, stop uint16, knownLength bool, flip uint16) {
		limit, chunk = max(limit, 1), max(chunk, 1)
		m := len(body)
		toEnd := int(stop) >= m
		read := int(stop)
		if toEnd {
			read = m
		}
		covered := min(read, int(limit))
		ended := toEnd && read <= int(limit)

		newRequest := func(b []byte, known bool) *http.Request {
			r := httptest.NewRequest(http.MethodPost, "/orders?a=1", nil)
			r.Header.Set("Content-Type", "application/octet-stream")
			if known {
				r.Body, r.ContentLength = io.NopCloser(bytes.NewReader(b)), int64(len(b))
			} else {
				r.Body, r.ContentLength = io.NopCloser(struct{ io.Reader }{bytes.NewReader(b)}), -1
			}
			return r
		}
		orig := newRequest(body, knownLength)
		rec := fptRecorder(orig, orig.Body, orig.ContentLength, int64(limit))
		p := fptRead{chunk: int(chunk), upTo: int(stop)}
		if toEnd {
			p.upTo = -1
		}
		require.Equal(t, read, p.consume(t, rec))
		fp := rec.seal()
		require.Len(t, fp, fpLen)
		require.Equal(t, uint64(covered), binary.BigEndian.Uint64(fp[1+sha256.Size:]), "recorded length")
		require.Equal(t, ended, fp[fpLen-1]&fpReachedEnd != 0, "recorded end")

		check := func(what string, retry []byte, want bool) {
			t.Helper()
			for _, known := range []bool{true, false} {
				got := matchFingerprint(httptest.NewRecorder(), newRequest(retry, known), fp, int64(limit), time.Second)
				require.Equal(t, want, got, "%s (retry length known: %v)", what, known)
			}
		}
		check("identical", body, true)
		if int(flip) < m {
			flipped := bytes.Clone(body)
			flipped[flip] ^= 0x01
			check("flipped", flipped, int(flip) >= covered)
		}
		check("one byte longer", append(bytes.Clone(body), '!'), !ended)
		if m > 0 {
			check("one byte shorter", body[:m-1], m-1 >= covered)
		}
	})
}
