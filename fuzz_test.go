package idempotency

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
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

// fuzzRecordReader builds values from the fuzz input, and zeros once it is
// used up.
type fuzzRecordReader struct{ p []byte }

func (r *fuzzRecordReader) byte() byte {
	if len(r.p) == 0 {
		return 0
	}
	b := r.p[0]
	r.p = r.p[1:]
	return b
}

func (r *fuzzRecordReader) bytes(max int) []byte {
	n := min(int(r.byte())%(max+1), len(r.p))
	b := r.p[:n]
	r.p = r.p[n:]
	return b
}

// fuzzRecordFrom builds a token and a completed record from data. The
// fields a store never sees empty but nil are normalised so that the
// decoded record compares equal.
func fuzzRecordFrom(data []byte) (string, *Record) {
	r := &fuzzRecordReader{p: data}
	token := string(r.bytes(recordMaxTokenLen))
	rec := &Record{State: StateCompleted, Token: token}
	rec.Response.StatusCode = 200 + int(binary.BigEndian.Uint16([]byte{r.byte(), r.byte()}))%800
	rec.Response.NotStored = string(r.bytes(16))
	if n := int(r.byte() % 6); n > 0 {
		rec.Response.Header = http.Header{}
		for range n {
			name := string(r.bytes(12))
			values := make([]string, r.byte()%4)
			for i := range values {
				values[i] = string(r.bytes(40))
			}
			rec.Response.Header[name] = values
		}
	}
	if fp := r.bytes(40); len(fp) > 0 {
		rec.Fingerprint = bytes.Clone(fp)
	}
	if len(r.p) > 0 {
		rec.Response.Body = bytes.Clone(r.p)
	}
	return token, rec
}

// FuzzRedisRecord checks the Redis store's record encoding: decoding any
// bytes never panics and gives either a record or an error wrapping
// ErrCorruptRecord; a decoded record encodes again to the same record; and
// records built from the input round-trip through encode and decode.
func FuzzRedisRecord(f *testing.F) {
	full := &Record{
		Fingerprint: []byte{1, 2, 3, 4},
		Response: Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Content-Type": {"application/json"}, "Link": {"<a>, <b>", "<c>"}, "X-Empty": {""}},
			Body:       []byte(`{"id":1}`),
		},
	}
	notStored := &Record{Response: Response{StatusCode: http.StatusCreated, NotStored: "too large", Header: http.Header{"Location": {"/o/1"}}}}
	for _, seed := range [][]byte{
		{},
		{1},
		{1, 1, 3, 'a', 'b', 'c', '1', '5', '0', '0'},
		{1, 1, 0, '-', '1'},
		{1, 1, 2, 't'},
		{1, 2, 1, 't', 0xc8, 0x01, 0, 0, 0, 0, 0},
		{1, 2, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
		{2, 2, 0},
		{1, 3, 0},
		{1, 2, 0, 0xc8, 0x01, 0, 0x80, 0x80, 0x80, 0x80, 0x10, 0x01},
		[]byte(encodeRecord("tok", full)),
		[]byte(encodeRecord("", notStored)),
		[]byte(encodeRecord("t", &Record{Response: Response{StatusCode: http.StatusNoContent}})),
	} {
		f.Add(seed)
	}
	f.Add([]byte(encodeRecord("tok", full)[:20]))
	f.Add([]byte(encodeRecord("tok", full) + "x"))

	f.Fuzz(func(t *testing.T, data []byte) {
		// Decode of arbitrary bytes.
		rec, err := decodeRecord(string(data))
		switch {
		case err != nil && rec != nil:
			t.Fatalf("decode returned both a record and %v", err)
		case err != nil:
			if !errors.Is(err, ErrCorruptRecord) {
				t.Fatalf("decode error %v does not wrap ErrCorruptRecord", err)
			}
		case rec == nil:
			t.Fatal("decode returned neither a record nor an error")
		case rec.State == StateInFlight:
			if len(rec.Token) > recordMaxTokenLen || rec.LeaseRemaining < 0 {
				t.Fatalf("in-flight record with token of %d bytes and lease %v", len(rec.Token), rec.LeaseRemaining)
			}
		case rec.State == StateCompleted:
			// A completed record is replayed with its status, which must
			// be one a handler can have written last: anything else
			// would make the replay's WriteHeader panic or turn a 1xx
			// into a final status.
			if s := rec.Response.StatusCode; s != http.StatusSwitchingProtocols && (s < 200 || s > 999) {
				t.Fatalf("decode accepted a completed record with status %d", s)
			}
			again, err := decodeRecord(string(encodeRecord(rec.Token, rec)))
			if err != nil {
				t.Fatalf("re-encoding a decoded record: %v", err)
			}
			fuzzRecordEqual(t, rec, again)
		default:
			t.Fatalf("decode returned a record in state %d", rec.State)
		}

		// Round trip of a record built from the input.
		token, built := fuzzRecordFrom(data)
		encoded := encodeRecord(token, built)
		got, err := decodeRecord(string(encoded))
		if err != nil {
			t.Fatalf("decoding an encoded record: %v", err)
		}
		fuzzRecordEqual(t, built, got)

		// An in-flight value as the claim script stores and returns it.
		lease := int64(binary.LittleEndian.Uint32(append(bytes.Clone(data), 0, 0, 0, 0)))
		inFlight := string([]byte{recordVersion, byte(StateInFlight), byte(len(token))}) + token + strconv.FormatInt(lease, 10)
		got, err = decodeRecord(inFlight)
		if err != nil {
			t.Fatalf("decoding an in-flight record: %v", err)
		}
		if got.State != StateInFlight || got.Token != token || got.LeaseRemaining != time.Duration(lease)*time.Millisecond {
			t.Fatalf("in-flight round trip: got %+v, want token %q lease %dms", got, token, lease)
		}
	})
}

// fuzzRecordEqual fails t unless the two completed records hold the same
// data, with nil and empty slices and maps counted as equal.
func fuzzRecordEqual(t *testing.T, want, got *Record) {
	t.Helper()
	if got.State != StateCompleted || got.Token != want.Token ||
		got.Response.StatusCode != want.Response.StatusCode || got.Response.NotStored != want.Response.NotStored ||
		!bytes.Equal(got.Fingerprint, want.Fingerprint) || !bytes.Equal(got.Response.Body, want.Response.Body) ||
		!fuzzHeadersEqual(want.Response.Header, got.Response.Header) {
		t.Fatalf("record round trip:\nwant %+v\ngot  %+v", want, got)
	}
	if got.LeaseRemaining != 0 {
		t.Fatalf("completed record with lease %v", got.LeaseRemaining)
	}
}

// TestRedisRecordDecodeRejectsImpossibleStatus: a completed record is
// replayed with its status, so one that no handler can have written last
// (0, a 1xx other than 101, more than 999) is corrupt. Accepting it would
// make the replay's WriteHeader panic (below 100) or send a 1xx followed
// by an implied 200.
func TestRedisRecordDecodeRejectsImpossibleStatus(t *testing.T) {
	for _, status := range []int{0, 1, 48, 99, 100, 103, 199, 1000, 4000} {
		value := encodeRecord("tok", &Record{Response: Response{StatusCode: status}})
		rec, err := decodeRecord(string(value))
		if err == nil {
			t.Errorf("status %d: decoded as a record with status %d, want ErrCorruptRecord", status, rec.Response.StatusCode)
			continue
		}
		if !errors.Is(err, ErrCorruptRecord) {
			t.Errorf("status %d: error %v does not wrap ErrCorruptRecord", status, err)
		}
	}
	for _, status := range []int{101, 200, 204, 599, 999} {
		value := encodeRecord("tok", &Record{Response: Response{StatusCode: status}})
		if _, err := decodeRecord(string(value)); err != nil {
			t.Errorf("status %d: %v", status, err)
		}
	}
}

// TestRedisRecordDecodeHugeValueCountFailsFast: a corrupt record that
// announces billions of values for one header name must be refused at
// once, not walked value by value.
func TestRedisRecordDecodeHugeValueCountFailsFast(t *testing.T) {
	value := "\x01\x02\x00\xc8\x01\ttoo large\x01\x01\bLocation\x9e\x9e\x9e\x9e\x9e\x01\x04/o/1\x00\x00"
	done := make(chan error, 1)
	go func() {
		_, err := decodeRecord(value)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrCorruptRecord) {
			t.Fatalf("decode: %v, want ErrCorruptRecord", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("decoding a record with a huge header value count did not return within 5s")
	}
}

// TestRedisRecordDecodeLeaseNeverNegative: the lease of an in-flight
// record comes from PTTL; digits that overflow a Duration must not turn
// into a negative lease.
func TestRedisRecordDecodeLeaseNeverNegative(t *testing.T) {
	for _, lease := range []string{"9223372036854775807", "99999999999999999", "9223372036854776"} {
		rec, err := decodeRecord("\x01\x01\x01t" + lease)
		if err != nil {
			if !errors.Is(err, ErrCorruptRecord) {
				t.Errorf("lease %s: error %v does not wrap ErrCorruptRecord", lease, err)
			}
			continue
		}
		if rec.LeaseRemaining < 0 {
			t.Errorf("lease %s ms decoded as %v", lease, rec.LeaseRemaining)
		}
	}
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
