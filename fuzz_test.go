package idempotency

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime/debug"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// The fuzz targets of this file run as seeds with the normal tests and for
// a fixed time in CI:
//
//	go test -run '^$' -fuzz '^FuzzRecorder$' -fuzztime 20s .
//	go test -run '^$' -fuzz '^FuzzRedisRecord$' -fuzztime 20s .
//
// FuzzParseKey, in key_test.go, covers the key header parser.

// fuzzRecMaxBody is the MaxResponseSize of the middleware under
// FuzzRecorder: small, so that programs reach the not-stored path.
const fuzzRecMaxBody = 4096

// fuzzRecStatuses are the statuses a program may write. 101 is left out:
// without a hijack it would hand the connection to the client.
var fuzzRecStatuses = [...]int{
	102, 103, 200, 201, 202, 203, 204, 205, 206, 301, 302, 304, 400, 404,
	408, 409, 410, 418, 422, 429, 500, 502, 503, 599, 999,
}

// fuzzRecHeaderNames are the header names a program may set: ordinary
// ones, the ones that change how net/http frames or sniffs the body, and
// the ones that are never replayed.
var fuzzRecHeaderNames = [...]string{
	"Content-Type", "Content-Encoding", "Location", "X-Multi", "Cache-Control",
	"Set-Cookie", "WWW-Authenticate", "Proxy-Authenticate", "Authentication-Info",
	"Date", "Vary", "Link",
}

// fuzzRecHeaderValues are the values a program may set; some hold commas
// that must never be split.
var fuzzRecHeaderValues = [...]string{
	"a", "b, c", `"q,uoted", x`, "text/html; charset=utf-8", "", "gzip",
	"application/json", "id=1; Path=/; HttpOnly", "</a>; rel=next, </b>; rel=prev",
}

// fuzzRecRun interprets program as calls on w: each operation is one byte
// and its arguments, read from the program itself. It never calls
// WriteHeader with an invalid code and sends at most three informational
// responses, as a well-behaved handler does.
func fuzzRecRun(w http.ResponseWriter, program []byte) {
	p := program
	next := func() byte {
		if len(p) == 0 {
			return 0
		}
		b := p[0]
		p = p[1:]
		return b
	}
	informational := 0
	for len(p) > 0 {
		switch op := next(); op % 8 {
		case 0:
			code := fuzzRecStatuses[int(next())%len(fuzzRecStatuses)]
			if code < 200 {
				if informational == 3 {
					continue
				}
				informational++
			}
			w.WriteHeader(code)
		case 1, 6:
			// A write of up to 63 bytes taken from the program.
			n := min(int(next()%64), len(p))
			data := p[:n]
			p = p[n:]
			if sw, ok := w.(io.StringWriter); ok && op%8 == 6 {
				_, _ = sw.WriteString(string(data))
			} else {
				_, _ = w.Write(data)
			}
		case 2:
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
		case 3, 4:
			name := fuzzRecHeaderNames[int(next())%len(fuzzRecHeaderNames)]
			value := fuzzRecHeaderValues[int(next())%len(fuzzRecHeaderValues)]
			if op%8 == 3 {
				w.Header().Set(name, value)
			} else {
				w.Header().Add(name, value)
			}
		case 5:
			w.Header().Del(fuzzRecHeaderNames[int(next())%len(fuzzRecHeaderNames)])
		case 7:
			// A large write: one byte repeated up to 4 KiB, so that the
			// response can outgrow net/http's buffer and the storage cap.
			n := (int(next())%16 + 1) * 256
			_, _ = w.Write(bytes.Repeat([]byte{next()}, n))
		}
	}
}

// fuzzRecSkipped are the response headers that are not compared between
// a first response and its replay: framing and Date, which net/http sets
// per response, the never-replayed headers and the replay marker.
var fuzzRecSkipped = map[string]bool{
	"Date": true, "Content-Length": true, "Transfer-Encoding": true, "Connection": true,
	"Keep-Alive": true, "Trailer": true, "Set-Cookie": true, "Www-Authenticate": true,
	"Proxy-Authenticate": true, "Authentication-Info": true, ReplayedHeader: true,
}

func fuzzRecComparable(h http.Header) http.Header {
	out := http.Header{}
	for name, values := range h {
		if !fuzzRecSkipped[name] {
			out[name] = values
		}
	}
	return out
}

// fuzzRecResponse is what a client received.
type fuzzRecResponse struct {
	status int
	header http.Header
	body   []byte
}

func fuzzRecDo(t *testing.T, client *http.Client, url, key string, program []byte) fuzzRecResponse {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(program))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Idempotency-Key", key)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("request: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	return fuzzRecResponse{status: resp.StatusCode, header: resp.Header, body: body}
}

// FuzzRecorder runs a handler that plays a program of WriteHeader, Write,
// WriteString, Flush and header calls decoded from the fuzz input, behind
// the middleware on a real HTTP/1.1 server, then sends the same request
// with the same key. Nothing may panic, and the retry must get what the
// first client received: the same status, body and headers (less the ones
// never replayed and net/http's framing), marked as replayed. A response
// the policy does not store runs again and gives the same answer; one over
// the size cap gets the not-stored problem with the original status.
func FuzzRecorder(f *testing.F) {
	for _, seed := range [][]byte{
		{},
		{0, 3, 1, 5, 'h', 'e', 'l', 'l', 'o'}, // 201 and a body
		{1, 3, 'a', 'b', 'c', 2, 1, 2, '<', 'h', 2, 7, 3, 'x'},          // streamed, flushed early
		{3, 0, 3, 0, 0, 4, 1, 3, 4, 3, 1, 0, 2, 1, 1, 'x'},              // headers, then 200 and a body
		{0, 0, 0, 1, 0, 2, 1, 2, 'h', 'i'},                              // 102 and 103, then 200
		{0, 6, 1, 4, 'n', 'o', 'p', 'e'},                                // 204 with a body
		{0, 11, 1, 2, 'n', 'o'},                                         // 304 with a body
		{7, 15, 'a', 7, 15, 'b'},                                        // 8 KiB: over the cap
		{0, 20, 1, 4, 'o', 'o', 'p', 's'},                               // 500: not stored
		{3, 1, 5, 1, 1, 0, 0, 4, 3, 5, 2, 2, 1, 'a'},                    // Content-Encoding, Location
		{2, 1, 2, 0, 0, 1, 1, 0},                                        // flush before any write
		{0, 3, 3, 0, 3, 4, 3, 1, 2, 'x', 'y', 0, 5},                     // headers after the status
		{6, 3, 'a', 'b', 'c', 2, 6, 1, 0x00},                            // sniffable, then binary
		{3, 2, 1, 3, 2, 2, 4, 2, 3, 1, 3, '{', '}', '\n'},               // multi-valued with commas
		{4, 5, 7, 4, 6, 2, 4, 8, 6, 4, 9, 0, 0, 3, 1, 1, 'x'},           // never-replayed headers
		{0, 21, 0, 24, 1, 3, 'b', 'y', 'e'},                             // 429 then a second status
		{7, 7, 'a', 2, 7, 3, 'b', 1, 5, 'x', 'y', 'z', 'w', 'v', 2},     // large writes and flushes
		{5, 0, 1, 10, '<', 'h', 't', 'm', 'l', '>', '<', 'b', '>', '<'}, // deleted type, html body
	} {
		f.Add(seed)
	}

	var panicked atomic.Pointer[string]
	var runs atomic.Int64
	store := NewMemoryStore()
	inner := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		program, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusTeapot)
			return
		}
		fuzzRecRun(w, program)
	})
	shouldStoreAll := func(int) bool { return true }
	mux := http.NewServeMux()
	mux.Handle("/default", New(Config{Store: store, MaxResponseSize: fuzzRecMaxBody})(inner))
	mux.Handle("/all", New(Config{Store: store, MaxResponseSize: fuzzRecMaxBody, ShouldStore: shouldStoreAll})(inner))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if p := recover(); p != nil {
				msg := fmt.Sprintf("%v\n%s", p, debug.Stack())
				panicked.Store(&msg)
				panic(http.ErrAbortHandler)
			}
		}()
		mux.ServeHTTP(w, r)
	}))
	f.Cleanup(srv.Close)
	client := &http.Client{
		Transport:     &http.Transport{DisableCompression: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Timeout:       30 * time.Second,
	}
	f.Cleanup(client.CloseIdleConnections)
	var seq atomic.Int64

	f.Fuzz(func(t *testing.T, program []byte) {
		if len(program) > 4096 {
			t.Skip("programs are kept short")
		}
		key := "fuzz-" + strconv.FormatInt(seq.Add(1), 10)
		defer func() { _ = store.Delete(context.Background(), StorageKey("", key)) }()
		path, storesAll := "/default", false
		if len(program) > 0 && program[0]&0x80 != 0 {
			path, storesAll = "/all", true
		}
		url := srv.URL + path

		runsBefore := runs.Load()
		first := fuzzRecDo(t, client, url, key, program)
		retry := fuzzRecDo(t, client, url, key, program)
		if p := panicked.Load(); p != nil {
			t.Fatalf("panic while serving program %v: %s", program, *p)
		}
		executions := runs.Load() - runsBefore

		if first.header.Get(ReplayedHeader) != "" {
			t.Fatalf("first execution carries %s", ReplayedHeader)
		}
		stored := storesAll || DefaultShouldStore(first.status)
		switch {
		case !stored:
			// Released: the retry ran the handler again.
			if executions != 2 || retry.header.Get(ReplayedHeader) != "" {
				t.Fatalf("status %d is not stored, yet the retry was not run again (%d executions)", first.status, executions)
			}
		case len(first.body) > fuzzRecMaxBody:
			if executions != 1 || retry.status != http.StatusInternalServerError {
				t.Fatalf("over the cap: retry got %d after %d executions, want the 500 problem", retry.status, executions)
			}
			var p Problem
			if err := json.Unmarshal(retry.body, &p); err != nil || p.OriginalStatus != first.status {
				t.Fatalf("not-stored problem %q does not carry original status %d", retry.body, first.status)
			}
			return
		default:
			if executions != 1 || retry.header.Get(ReplayedHeader) != "true" {
				t.Fatalf("retry was not a replay (%d executions, status %d)", executions, retry.status)
			}
			if bodyAllowed(retry.status) {
				if cl := retry.header.Get("Content-Length"); cl != strconv.Itoa(len(retry.body)) {
					t.Fatalf("replay Content-Length %q for a body of %d bytes", cl, len(retry.body))
				}
			}
		}
		if retry.status != first.status {
			t.Fatalf("status: first %d, retry %d (program %v)", first.status, retry.status, program)
		}
		if !bytes.Equal(retry.body, first.body) {
			t.Fatalf("body: first %q, retry %q (program %v)", first.body, retry.body, program)
		}
		want, got := fuzzRecComparable(first.header), fuzzRecComparable(retry.header)
		if !fuzzHeadersEqual(want, got) {
			t.Fatalf("headers: first %v, retry %v (program %v)", want, got, program)
		}
	})
}

func fuzzHeadersEqual(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for name, av := range a {
		bv, ok := b[name]
		if !ok || len(av) != len(bv) {
			return false
		}
		for i := range av {
			if av[i] != bv[i] {
				return false
			}
		}
	}
	return true
}

// TestReplayContentTypeMatchesFirstResponse: when the handler sets no
// Content-Type, net/http sniffs one from the first bytes it sends (only
// those written before the first flush) or sends none if it flushed
// before any byte. The replay must carry the Content-Type the first
// client got, not one sniffed from the whole stored body.
func TestReplayContentTypeMatchesFirstResponse(t *testing.T) {
	tests := []struct {
		name  string
		write func(w http.ResponseWriter)
	}{
		{"text flushed, then binary", func(w http.ResponseWriter) {
			_, _ = io.WriteString(w, "abc")
			w.(http.Flusher).Flush()
			_, _ = w.Write([]byte{0, 1, 2})
		}},
		{"flushed before any byte", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusCreated)
			w.(http.Flusher).Flush()
			_, _ = io.WriteString(w, "<html><body>hi</body></html>")
		}},
		{"no flush", func(w http.ResponseWriter) {
			_, _ = io.WriteString(w, "<html><body>")
			_, _ = io.WriteString(w, "hi</body></html>")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(New(Config{})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				tt.write(w)
			})))
			defer srv.Close()
			first := fuzzRecDo(t, srv.Client(), srv.URL, "ct", nil)
			retry := fuzzRecDo(t, srv.Client(), srv.URL, "ct", nil)
			if retry.header.Get(ReplayedHeader) != "true" {
				t.Fatalf("the retry was not a replay")
			}
			if got, want := retry.header.Values("Content-Type"), first.header.Values("Content-Type"); !slices.Equal(got, want) {
				t.Errorf("replay Content-Type %q, first response %q", got, want)
			}
			if !bytes.Equal(first.body, retry.body) {
				t.Errorf("body: first %q, replay %q", first.body, retry.body)
			}
		})
	}
}
