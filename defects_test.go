package idempotency_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// Regression tests for reported defects, one test (or table) per defect,
// each against a real server and client. Every client gives up after
// defectClientTimeout and every blocked goroutine is let go in a cleanup,
// so a regression fails the test instead of hanging it.

// defectClientTimeout bounds every request of these tests, so that a hang
// fails quickly; defectPrompt is the bound of the timing assertions, well
// above what a correct answer takes and well below the timeout.
const (
	defectClientTimeout = 3 * time.Second
	defectPrompt        = time.Second
)

// defectServe serves h on a new test server, HTTP/2 over TLS when h2 is
// set, with the server's error log discarded, and returns it with a
// client of its own that gives up after defectClientTimeout.
func defectServe(t *testing.T, h http.Handler, h2 bool) (*httptest.Server, *http.Client) {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	if h2 {
		srv.EnableHTTP2 = true
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	client := srv.Client()
	client.Timeout = defectClientTimeout
	t.Cleanup(client.CloseIdleConnections)
	return srv, client
}

// defectResult is a response read to its end.
type defectResult struct {
	status  int
	header  http.Header
	trailer http.Header
	body    string
}

func (r defectResult) replayed() bool {
	return r.header.Get(idempotency.ReplayedHeader) == "true"
}

// defectRequest returns a request with key in the default key header,
// unless key is empty, and the given extra header fields.
func defectRequest(t *testing.T, method, url, key string, body io.Reader, header ...string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	require.NoError(t, err)
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return req
}

// defectDo sends req and reads the whole response.
func defectDo(t *testing.T, client *http.Client, req *http.Request) defectResult {
	t.Helper()
	resp, err := client.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return defectResult{resp.StatusCode, resp.Header, resp.Trailer, string(b)}
}

// defectPost sends a POST with key (none when empty) and body, and reads
// the whole response.
func defectPost(t *testing.T, client *http.Client, url, key, body string, header ...string) defectResult {
	t.Helper()
	return defectDo(t, client, defectRequest(t, http.MethodPost, url, key, strings.NewReader(body), header...))
}

// defectStalledBody returns a request body that sends the first bytes of
// an upload, then stalls until the test ends.
func defectStalledBody(t *testing.T, first string) io.Reader {
	t.Helper()
	pr, pw := io.Pipe()
	go func() { _, _ = io.WriteString(pw, first) }()
	// Runs before the server's cleanup, so that a handler blocked on the
	// body is let go before the server waits for it.
	t.Cleanup(func() { _ = pw.CloseWithError(errors.New("test over")) })
	return pr
}

// defectTimed sends req, measuring how long the response head took.
func defectTimed(t *testing.T, client *http.Client, req *http.Request) (defectResult, time.Duration, error) {
	t.Helper()
	start := time.Now()
	resp, err := client.Do(req)
	took := time.Since(start)
	if err != nil {
		return defectResult{}, took, err
	}
	defer resp.Body.Close()
	// The body is the handler's own short answer: it is complete as soon as
	// the head is there.
	b, _ := io.ReadAll(resp.Body)
	return defectResult{resp.StatusCode, resp.Header, resp.Trailer, string(b)}, took, nil
}

// defectEvents records the events an Observer is told.
type defectEvents struct {
	mu     sync.Mutex
	events []idempotency.Event
}

func (e *defectEvents) observe(ev idempotency.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.events = append(e.events, ev)
}

// has reports whether an event with outcome was seen, and its detail.
func (e *defectEvents) has(outcome idempotency.Outcome) (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ev := range e.events {
		if ev.Outcome == outcome {
			return ev.Detail, true
		}
	}
	return "", false
}

// defectProblem is the JSON body of a problem response.
type defectProblem struct {
	Type           string `json:"type"`
	Status         int    `json:"status"`
	Detail         string `json:"detail"`
	OriginalStatus int    `json:"original_status"`
}

// defectDecodeProblem checks that r is a problem response and decodes it.
func defectDecodeProblem(t *testing.T, r defectResult) defectProblem {
	t.Helper()
	assert.Equal(t, "application/problem+json", r.header.Get("Content-Type"))
	var p defectProblem
	assert.NoError(t, json.Unmarshal([]byte(r.body), &p), "body: %s", r.body)
	return p
}

// A handler still reading a body the client stalls on, on HTTP/2, must not
// hold back the answer it already gave.
func TestDefect01PendingBodyReadHTTP2(t *testing.T) {
	readAll := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		w.WriteHeader(http.StatusCreated)
	})
	// answerWhileReading answers 202 while a goroutine it started is still
	// blocked reading the body: it returns once that goroutine has had
	// the bytes sent so far and is reading again.
	answerWhileReading := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reading := make(chan struct{})
		go func() {
			_, _ = io.ReadAll(&defectSignalReader{r: r.Body, after: 10, reading: reading})
		}()
		select {
		case <-reading:
		case <-r.Context().Done():
		}
		w.WriteHeader(http.StatusAccepted)
	})
	tests := []struct {
		name       string
		handler    http.Handler
		middleware bool
		want       int
	}{
		{"timeout handler without middleware", http.TimeoutHandler(readAll, 100*time.Millisecond, "timeout"), false, http.StatusServiceUnavailable},
		{"timeout handler", http.TimeoutHandler(readAll, 100*time.Millisecond, "timeout"), true, http.StatusServiceUnavailable},
		{"goroutine still reading without middleware", answerWhileReading, false, http.StatusAccepted},
		{"goroutine still reading", answerWhileReading, true, http.StatusAccepted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := tt.handler
			if tt.middleware {
				h = idempotency.New(idempotency.Config{})(h)
			}
			srv, client := defectServe(t, h, true)
			req := defectRequest(t, http.MethodPost, srv.URL, "pending-read", defectStalledBody(t, "0123456789"))
			r, took, err := defectTimed(t, client, req)
			require.NoError(t, err, "no answer after %v", took)
			assert.Equal(t, tt.want, r.status)
			assert.Less(t, took, defectPrompt)
		})
	}
}

// defectSignalReader closes reading when Read is called once after bytes
// of r have come through: the caller is then reading past them.
type defectSignalReader struct {
	r       io.Reader
	after   int
	n       int
	reading chan struct{}
	once    sync.Once
}

func (s *defectSignalReader) Read(p []byte) (int, error) {
	if s.n >= s.after {
		s.once.Do(func() { close(s.reading) })
	}
	n, err := s.r.Read(p)
	s.n += n
	return n, err
}

// A handler that answers without reading the body gets its answer to the
// client as fast as without the middleware: the fingerprint must not wait
// for the upload.
func TestDefect02EarlyAnswerNotHeldBack(t *testing.T) {
	refuse := func(status int) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(status)
			_, _ = io.WriteString(w, "refused")
		}
	}
	t.Run("HTTP2 upload still open", func(t *testing.T) {
		for _, status := range []int{http.StatusForbidden, http.StatusRequestEntityTooLarge} {
			for _, middleware := range []bool{false, true} {
				t.Run(fmt.Sprintf("%d middleware=%v", status, middleware), func(t *testing.T) {
					var h http.Handler = refuse(status)
					if middleware {
						h = idempotency.New(idempotency.Config{})(h)
					}
					srv, client := defectServe(t, h, true)
					req := defectRequest(t, http.MethodPost, srv.URL, "early-answer", defectStalledBody(t, "abc"))
					r, took, err := defectTimed(t, client, req)
					require.NoError(t, err, "no answer after %v", took)
					assert.Equal(t, status, r.status)
					assert.Less(t, took, defectPrompt)
				})
			}
		}
	})
	t.Run("HTTP1.1 Expect 100-continue", func(t *testing.T) {
		for _, middleware := range []bool{false, true} {
			t.Run(fmt.Sprintf("middleware=%v", middleware), func(t *testing.T) {
				var h http.Handler = refuse(http.StatusRequestEntityTooLarge)
				if middleware {
					h = idempotency.New(idempotency.Config{})(h)
				}
				srv, _ := defectServe(t, h, false)
				conn, err := net.DialTimeout("tcp", srv.Listener.Addr().String(), defectClientTimeout)
				require.NoError(t, err)
				t.Cleanup(func() { _ = conn.Close() })
				require.NoError(t, conn.SetDeadline(time.Now().Add(defectClientTimeout)))
				start := time.Now()
				_, err = io.WriteString(conn, "POST /upload HTTP/1.1\r\n"+
					"Host: test\r\n"+
					"Idempotency-Key"+": expect-continue\r\n"+
					"Content-Type: application/octet-stream\r\n"+
					"Content-Length: 20\r\n"+
					"Expect: 100-continue\r\n\r\n")
				require.NoError(t, err)
				// No body byte is sent: a server that asks for one with
				// 100 Continue is reading what the handler never asked for.
				line, err := bufio.NewReader(conn).ReadString('\n')
				require.NoError(t, err)
				assert.True(t, strings.HasPrefix(line, "HTTP/1.1 413 "), "first status line: %q", line)
				assert.Less(t, time.Since(start), defectPrompt)
			})
		}
	})
}

// Two instances on one store, a router-wide one and a route group's own:
// the inner one lets the outer one's claim through, whatever its own
// settings, and still requires its key when the outer one claimed nothing.
func TestDefect03NestedInstances(t *testing.T) {
	tests := []struct {
		name  string
		inner idempotency.Config
	}{
		{"same settings", idempotency.Config{RequireKey: true}},
		{"inner header name", idempotency.Config{RequireKey: true, HeaderName: "X-Request-Key"}},
		{"inner TTL", idempotency.Config{RequireKey: true, TTL: time.Hour}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := idempotency.NewMemoryStore()
			outer := idempotency.New(idempotency.Config{Store: st})
			innerCfg := tt.inner
			innerCfg.Store = st
			inner := idempotency.New(innerCfg)
			var runs atomic.Int64
			srv, client := defectServe(t, outer(inner(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				n := runs.Add(1)
				w.WriteHeader(http.StatusCreated)
				fmt.Fprintf(w, "order %d", n)
			}))), false)

			first := defectPost(t, client, srv.URL, "nested", "{}")
			assert.Equal(t, http.StatusCreated, first.status, "body: %s", first.body)
			assert.Equal(t, "order 1", first.body)
			assert.False(t, first.replayed())

			retry := defectPost(t, client, srv.URL, "nested", "{}")
			assert.Equal(t, http.StatusCreated, retry.status, "body: %s", retry.body)
			assert.True(t, retry.replayed())
			assert.Equal(t, "order 1", retry.body)
			assert.EqualValues(t, 1, runs.Load())

			// No key at all: the outer instance claims nothing, the inner
			// one requires its key.
			none := defectPost(t, client, srv.URL, "", "{}")
			assert.Equal(t, http.StatusBadRequest, none.status)
			assert.Equal(t, "application/problem+json", none.header.Get("Content-Type"))
			assert.EqualValues(t, 1, runs.Load())

			if h := innerCfg.HeaderName; h != "" {
				// A key the inner instance alone reads: it claims it.
				own := defectPost(t, client, srv.URL, "", "{}", h, "inner-only")
				assert.Equal(t, http.StatusCreated, own.status, "body: %s", own.body)
				assert.Equal(t, "order 2", own.body)
				own = defectPost(t, client, srv.URL, "", "{}", h, "inner-only")
				assert.Equal(t, http.StatusCreated, own.status, "body: %s", own.body)
				assert.True(t, own.replayed())
				assert.Equal(t, "order 2", own.body)
				assert.EqualValues(t, 2, runs.Load())
			}
		})
	}
}

// Header names set by hand in a non-canonical form are canonicalised before
// the no-replay policy applies: the retry gets neither the first caller's
// cookie nor a hop-by-hop header.
func TestDefect05NonCanonicalHeadersNotReplayed(t *testing.T) {
	for _, name := range []string{"set-cookie", "www-authenticate", "proxy-connection", "keep-alive"} {
		t.Run(name, func(t *testing.T) {
			srv, client := defectServe(t, idempotency.New(idempotency.Config{})(http.HandlerFunc(
				func(w http.ResponseWriter, r *http.Request) {
					w.Header()[name] = []string{"a=b"}
					w.WriteHeader(http.StatusCreated)
					_, _ = io.WriteString(w, "created")
				})), false)
			first := defectPost(t, client, srv.URL, "hand-set", "{}")
			require.Equal(t, http.StatusCreated, first.status)
			require.Equal(t, "a=b", first.header.Get(name), "the first caller gets the header")

			retry := defectPost(t, client, srv.URL, "hand-set", "{}")
			require.True(t, retry.replayed())
			assert.Equal(t, "created", retry.body)
			for k, v := range retry.header {
				assert.False(t, strings.EqualFold(k, name), "replayed %s: %q", k, v)
			}
		})
	}
}

// Trailers are not stored, however they were declared; a replay over
// HTTP/2 carries neither the trailer nor a header under the trailer prefix.
func TestDefect06TrailersNotReplayed(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
	}{
		{"prefix after the body", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, "payload")
			w.Header().Set(http.TrailerPrefix+"X-Sum", "abc")
		}},
		{"prefix before the header", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set(http.TrailerPrefix+"X-Sum", "abc")
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, "payload")
		}},
		{"declared", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Trailer", "X-Sum")
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, "payload")
			w.Header().Set("X-Sum", "abc")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, client := defectServe(t, idempotency.New(idempotency.Config{})(tt.handler), true)
			first := defectPost(t, client, srv.URL, "trailer", "{}")
			require.Equal(t, http.StatusCreated, first.status)
			require.Equal(t, "abc", first.trailer.Get("X-Sum"), "the first caller gets the trailer")

			retry := defectPost(t, client, srv.URL, "trailer", "{}")
			require.True(t, retry.replayed())
			assert.Equal(t, http.StatusCreated, retry.status)
			assert.Equal(t, "payload", retry.body)
			assert.Empty(t, retry.trailer.Values("X-Sum"), "trailers: %v", retry.trailer)
			assert.Empty(t, retry.header.Values("X-Sum"))
			assert.Empty(t, retry.header.Values("Trailer"))
			for k, v := range retry.header {
				assert.False(t, strings.HasPrefix(strings.ToLower(k), strings.ToLower(http.TrailerPrefix)), "replayed %s: %q", k, v)
			}
		})
	}
}

// A response shorter than its declared Content-Length reached its client
// broken: the key is completed as not stored, never replayed as a success.
func TestDefect07ShortResponseNotReplayed(t *testing.T) {
	var events defectEvents
	var runs atomic.Int64
	srv, client := defectServe(t, idempotency.New(idempotency.Config{Observer: events.observe})(http.HandlerFunc(
		func(w http.ResponseWriter, r *http.Request) {
			runs.Add(1)
			w.Header().Set("Content-Length", "100")
			_, _ = io.WriteString(w, "0123456789")
		})), false)

	resp, err := client.Do(defectRequest(t, http.MethodPost, srv.URL, "short", strings.NewReader("{}")))
	require.NoError(t, err)
	_, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	require.ErrorIs(t, err, io.ErrUnexpectedEOF, "the first client sees the response cut short")

	retry := defectPost(t, client, srv.URL, "short", "{}")
	assert.Equal(t, http.StatusInternalServerError, retry.status, "body: %q", retry.body)
	assert.False(t, retry.status == http.StatusOK && retry.replayed(), "a truncated body replayed as a success")
	p := defectDecodeProblem(t, retry)
	assert.Contains(t, p.Detail, "not stored")
	assert.Equal(t, http.StatusOK, p.OriginalStatus)
	assert.EqualValues(t, 1, runs.Load())

	assert.Eventually(t, func() bool {
		detail, ok := events.has(idempotency.OutcomeNotStored)
		return ok && detail == "incomplete"
	}, 2*time.Second, 10*time.Millisecond, "no OutcomeNotStored with detail incomplete")
}

// An upload broken mid-body did not arrive whole: the handler's 400 is not
// kept, and the identical, complete retry runs.
func TestDefect08BrokenUploadRetryRuns(t *testing.T) {
	settled := make(chan idempotency.Event, 16)
	var runs atomic.Int64
	srv, client := defectServe(t, idempotency.New(idempotency.Config{Observer: func(ev idempotency.Event) {
		switch ev.Outcome {
		case idempotency.OutcomeExecuted, idempotency.OutcomeReleased, idempotency.OutcomeNotStored:
			select {
			case settled <- ev:
			default:
			}
		}
	}})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, "broken upload", http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, "got %d bytes", len(b))
	})), false)
	body := strings.Repeat("0123456789", 10)

	conn, err := net.DialTimeout("tcp", srv.Listener.Addr().String(), defectClientTimeout)
	require.NoError(t, err)
	_, err = io.WriteString(conn, "POST / HTTP/1.1\r\n"+
		"Host: test\r\n"+
		"Idempotency-Key"+": broken\r\n"+
		"Content-Type: application/octet-stream\r\n"+
		"Content-Length: 100\r\n\r\n"+
		body[:40])
	require.NoError(t, err)
	require.NoError(t, conn.Close())

	select {
	case ev := <-settled:
		assert.Equal(t, http.StatusBadRequest, ev.Status)
	case <-time.After(defectClientTimeout):
		t.Fatal("the broken upload was never settled")
	}

	retry := defectPost(t, client, srv.URL, "broken", body, "Content-Type", "application/octet-stream")
	assert.Equal(t, http.StatusCreated, retry.status, "body: %q", retry.body)
	assert.Equal(t, "got 100 bytes", retry.body)
	assert.False(t, retry.replayed())
	assert.EqualValues(t, 2, runs.Load())
}

// Equivalent forms of one request are the same request; forms a router or
// handler may tell apart are not.
func TestDefect09EquivalentRequests(t *testing.T) {
	type form struct{ path, ctype, body string }
	tests := []struct {
		name        string
		first, then form
		same        bool
	}{
		{"identical", form{"/a", "application/json", "{}"}, form{"/a", "application/json", "{}"}, true},
		{"percent-encoding case", form{"/a%2fb", "", "{}"}, form{"/a%2Fb", "", "{}"}, true},
		{"unreserved escaped", form{"/%7Ea", "", "{}"}, form{"/~a", "", "{}"}, true},
		{"media type case", form{"/a", "application/json", "{}"}, form{"/a", "Application/JSON", "{}"}, true},
		{"charset case and spaces", form{"/a", "application/json; charset=utf-8", "{}"}, form{"/a", "application/json;charset=UTF-8", "{}"}, true},
		{"escaped slash is not a slash", form{"/a%2Fb", "", "{}"}, form{"/a/b", "", "{}"}, false},
		{"query order", form{"/a?a=1&b=2", "", "{}"}, form{"/a?b=2&a=1", "", "{}"}, false},
		{"different body", form{"/a", "application/json", `{"n":1}`}, form{"/a", "application/json", `{"n":2}`}, false},
	}
	var runs atomic.Int64
	srv, client := defectServe(t, idempotency.New(idempotency.Config{})(http.HandlerFunc(
		func(w http.ResponseWriter, r *http.Request) {
			runs.Add(1)
			b, _ := io.ReadAll(r.Body)
			w.WriteHeader(http.StatusCreated)
			fmt.Fprintf(w, "%s %d", r.URL.EscapedPath(), len(b))
		})), false)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := fmt.Sprintf("equivalent-%d", i)
			send := func(f form) defectResult {
				var header []string
				if f.ctype != "" {
					header = []string{"Content-Type", f.ctype}
				}
				return defectPost(t, client, srv.URL+f.path, key, f.body, header...)
			}
			before := runs.Load()
			first := send(tt.first)
			require.Equal(t, http.StatusCreated, first.status)
			retry := send(tt.then)
			if tt.same {
				assert.Equal(t, http.StatusCreated, retry.status, "body: %s", retry.body)
				assert.True(t, retry.replayed())
				assert.Equal(t, first.body, retry.body)
			} else {
				assert.Equal(t, http.StatusUnprocessableEntity, retry.status, "body: %s", retry.body)
				assert.False(t, retry.replayed())
			}
			assert.Equal(t, before+1, runs.Load())
		})
	}
}

// defectFlakyStore is a memory store whose Complete fails while failing is
// set.
type defectFlakyStore struct {
	*idempotency.MemoryStore
	failing   atomic.Bool
	completes atomic.Int64
}

var errDefectStoreDown = errors.New("store down")

func (s *defectFlakyStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	s.completes.Add(1)
	if s.failing.Load() {
		return errDefectStoreDown
	}
	return s.MemoryStore.Complete(ctx, key, token, rec, ttl)
}

// A completion that fails is retried in the background: the client's
// response ends when the handler returns, and the retry later finds it
// stored.
func TestDefect10FailedCompletionDoesNotDelayResponse(t *testing.T) {
	st := &defectFlakyStore{MemoryStore: idempotency.NewMemoryStore()}
	st.failing.Store(true)
	t.Cleanup(func() { st.failing.Store(false) }) // whatever happens, let a retry loop end
	var runs atomic.Int64
	srv, client := defectServe(t, idempotency.New(idempotency.Config{Store: st, LockTTL: 10 * time.Second})(http.HandlerFunc(
		func(w http.ResponseWriter, r *http.Request) {
			runs.Add(1)
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, "part one,")
			w.(http.Flusher).Flush()
			_, _ = io.WriteString(w, " part two")
		})), false)
	before := runtime.NumGoroutine()

	start := time.Now()
	resp, err := client.Do(defectRequest(t, http.MethodPost, srv.URL, "flaky", strings.NewReader("{}")))
	require.NoError(t, err)
	type read struct {
		body string
		err  error
		took time.Duration
	}
	done := make(chan read, 1)
	go func() {
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		done <- read{string(b), err, time.Since(start)}
	}()
	select {
	case r := <-done:
		require.NoError(t, r.err)
		assert.Equal(t, "part one, part two", r.body)
		assert.Less(t, r.took, defectPrompt)
	case <-time.After(defectPrompt):
		t.Errorf("the response had not ended %v after the request", defectPrompt)
		st.failing.Store(false)
		r := <-done // the client's timeout bounds it
		t.Logf("the response ended after %v (err %v)", r.took, r.err)
	}
	assert.GreaterOrEqual(t, st.completes.Load(), int64(1), "a completion was attempted")

	st.failing.Store(false)
	var retry defectResult
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		retry = defectPost(t, client, srv.URL, "flaky", "{}")
		if retry.replayed() || time.Now().After(deadline) {
			break
		}
	}
	assert.True(t, retry.replayed(), "the response was never stored; last retry: %d %s", retry.status, retry.body)
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.Equal(t, "part one, part two", retry.body)
	assert.EqualValues(t, 1, runs.Load())

	// Polled here rather than in a helper goroutine, which would count.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		client.CloseIdleConnections() // a connection goes back to the pool after its body is read
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<16)
		t.Errorf("goroutines left once the store recovered: %d before, %d after\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
}

// An observer that panics after the handler returned never leaves the
// claim behind: the retry is answered at once, never with a 409 until
// LockTTL runs out.
func TestDefect11PanickingObserverSettlesClaim(t *testing.T) {
	tests := []struct {
		name    string
		status  int
		panicOn idempotency.Outcome
		// storeDown makes Complete fail until the observer is told; a 409
		// is then allowed while the completion is retried.
		storeDown bool
		want      []string // the bodies the retry may get
		replayed  bool
	}{
		{"executed", http.StatusCreated, idempotency.OutcomeExecuted, false, []string{"run 1"}, true},
		{"released", http.StatusInternalServerError, idempotency.OutcomeReleased, false, []string{"run 2"}, false},
		// Settled either way: stored by a later attempt (replayed) or
		// released (run again).
		{"store error while completing", http.StatusCreated, idempotency.OutcomeStoreError, true, []string{"run 1", "run 2"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := &defectFlakyStore{MemoryStore: idempotency.NewMemoryStore()}
			st.failing.Store(tt.storeDown)
			var runs atomic.Int64
			var panicked atomic.Bool
			cfg := idempotency.Config{
				Store:   st,
				LockTTL: 30 * time.Second,
				Observer: func(ev idempotency.Event) {
					// Once, and only while the request is being served, so
					// that the panic reaches the server's recovery rather
					// than a goroutine with none.
					if ev.Outcome != tt.panicOn || ev.Request == nil || ev.Request.Context().Err() != nil || !panicked.CompareAndSwap(false, true) {
						return
					}
					st.failing.Store(false)
					panic("observer failed")
				},
			}
			srv, client := defectServe(t, idempotency.New(cfg)(http.HandlerFunc(
				func(w http.ResponseWriter, r *http.Request) {
					n := runs.Add(1)
					w.WriteHeader(tt.status)
					fmt.Fprintf(w, "run %d", n)
				})), false)

			// The panic reaches the server, which drops the connection: the
			// first client may get no answer. The connection is not reused.
			first := defectRequest(t, http.MethodPost, srv.URL, "observed", strings.NewReader("{}"))
			first.Close = true
			if resp, err := client.Do(first); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			require.EqualValues(t, 1, runs.Load())
			require.True(t, panicked.Load(), "the observer was never told %v", tt.panicOn)

			start := time.Now()
			var r defectResult
			for {
				r = defectPost(t, client, srv.URL, "observed", "{}")
				if r.status != http.StatusConflict || !tt.storeDown || time.Since(start) > defectPrompt {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			assert.Less(t, time.Since(start), defectPrompt)
			assert.NotEqual(t, http.StatusConflict, r.status, "the claim was left behind: %s", r.body)
			assert.Equal(t, tt.status, r.status, "body: %s", r.body)
			assert.Contains(t, tt.want, r.body)
			if r.body == "run 1" {
				assert.True(t, r.replayed())
			} else {
				assert.Equal(t, tt.replayed, r.replayed())
			}
		})
	}
}
