package idempotency

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/textproto"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recWait bounds every wait in these tests: it only turns a hang into a
// failure, it never measures speed.
const recWait = 10 * time.Second

// recProtos are the protocols the server-backed tests run on.
var recProtos = []struct {
	name string
	h2   bool
}{
	{"HTTP/1.1", false},
	{"HTTP/2", true},
}

// recCall is what a test handler gets: the recorder under test, the
// server's own writer and request, and places to note what it observed.
type recCall struct {
	rec    *recorder
	w      http.ResponseWriter
	r      *http.Request
	events []string
	errs   []error
	vals   map[string]any
}

// note appends an event to the call's ordered event log.
func (c *recCall) note(format string, args ...any) {
	c.events = append(c.events, fmt.Sprintf(format, args...))
}

// newRecorder returns a recorder wrapping w, as a flight sets one up.
func newRecorder(w http.ResponseWriter, maxBody int) *recorder {
	return &recorder{w: w, maxBody: maxBody, declLen: -1, flushed: -1}
}

// recOutcome is everything the recorder reported once the handler returned.
type recOutcome struct {
	status      int
	header      http.Header
	body        []byte
	overflowed  bool
	hijacked    bool
	wroteHeader bool
	events      []string
	errs        []error
	vals        map[string]any
}

// recSpyWriter wraps the server's writer and logs, in order, the calls the
// recorder makes on it. It hides every optional interface, so the recorder
// must reach them through Unwrap.
type recSpyWriter struct {
	http.ResponseWriter
	c *recCall
}

func (s recSpyWriter) WriteHeader(code int) {
	s.c.note("header %d", code)
	s.ResponseWriter.WriteHeader(code)
}

func (s recSpyWriter) Write(p []byte) (int, error) {
	s.c.note("write %q", p)
	return s.ResponseWriter.Write(p)
}

func (s recSpyWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// recSyncBuffer is a bytes.Buffer safe for the server's error log.
type recSyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *recSyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *recSyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// recHarness is a real server whose handler runs a test function on a
// recorder wrapping the server's writer.
type recHarness struct {
	srv  *httptest.Server
	out  chan recOutcome
	logs *recSyncBuffer
}

// recOptions configure recServe.
type recOptions struct {
	h2      bool
	maxBody int
	spy     bool // wrap the server's writer in a recSpyWriter
}

// recServe starts a server (HTTP/1.1, or HTTP/2 over TLS) whose handler
// wraps its writer in a recorder, runs fn, and reports the recorder's
// results on the harness channel.
func recServe(t *testing.T, opt recOptions, fn func(c *recCall)) *recHarness {
	t.Helper()
	h := &recHarness{out: make(chan recOutcome, 16), logs: &recSyncBuffer{}}
	h.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := &recCall{w: w, r: r, vals: map[string]any{}}
		inner := w
		if opt.spy {
			inner = recSpyWriter{ResponseWriter: w, c: c}
		}
		rec := newRecorder(inner, opt.maxBody)
		c.rec = rec
		defer func() {
			h.out <- recOutcome{
				status:      rec.status(),
				header:      rec.header().Clone(),
				body:        bytes.Clone(rec.buf),
				overflowed:  rec.over,
				hijacked:    rec.hijacked,
				wroteHeader: rec.wrote,
				events:      c.events,
				errs:        c.errs,
				vals:        c.vals,
			}
		}()
		fn(c)
	}))
	h.srv.Config.ErrorLog = log.New(h.logs, "", 0)
	if opt.h2 {
		h.srv.EnableHTTP2 = true
		h.srv.StartTLS()
	} else {
		h.srv.Start()
	}
	t.Cleanup(h.srv.Close)
	return h
}

// outcome waits for the result of the next request the handler served.
func (h *recHarness) outcome(t *testing.T) recOutcome {
	t.Helper()
	select {
	case o := <-h.out:
		return o
	case <-time.After(recWait):
		t.Fatal("handler did not finish")
		return recOutcome{}
	}
}

// get sends a GET and returns the response with its body read whole.
func (h *recHarness) get(t *testing.T, h2 bool) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, h.srv.URL, nil)
	require.NoError(t, err)
	return h.do(t, h2, req)
}

// do sends req and returns the response with its body read whole.
func (h *recHarness) do(t *testing.T, h2 bool, req *http.Request) (*http.Response, []byte) {
	t.Helper()
	resp, err := h.srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	if h2 {
		require.Equal(t, 2, resp.ProtoMajor, "the test must run on HTTP/2")
	} else {
		require.Equal(t, 1, resp.ProtoMajor)
	}
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, body
}

func TestRecorderStatus(t *testing.T) {
	tests := []struct {
		name    string
		handler func(c *recCall)
		status  int
		body    string
		wrote   bool
	}{
		{
			name: "first WriteHeader wins",
			handler: func(c *recCall) {
				c.rec.WriteHeader(http.StatusCreated)
				c.rec.WriteHeader(http.StatusInternalServerError)
				_, _ = c.rec.Write([]byte("made"))
				c.rec.WriteHeader(http.StatusAccepted)
			},
			status: http.StatusCreated, body: "made", wrote: true,
		},
		{
			name:    "Write implies 200",
			handler: func(c *recCall) { _, _ = c.rec.Write([]byte("hi")); c.rec.WriteHeader(http.StatusTeapot) },
			status:  http.StatusOK, body: "hi", wrote: true,
		},
		{
			name:    "empty Write implies 200",
			handler: func(c *recCall) { _, _ = c.rec.Write(nil); c.rec.WriteHeader(http.StatusTeapot) },
			status:  http.StatusOK, wrote: true,
		},
		{
			name:    "WriteString implies 200",
			handler: func(c *recCall) { _, _ = io.WriteString(c.rec, "text") },
			status:  http.StatusOK, body: "text", wrote: true,
		},
		{
			name:    "Flush implies 200",
			handler: func(c *recCall) { c.rec.Flush(); c.rec.WriteHeader(http.StatusTeapot) },
			status:  http.StatusOK, wrote: true,
		},
		{
			name:    "nothing written is 200",
			handler: func(c *recCall) {},
			status:  http.StatusOK,
		},
		{
			name:    "status without body",
			handler: func(c *recCall) { c.rec.WriteHeader(http.StatusNoContent) },
			status:  http.StatusNoContent, wrote: true,
		},
	}
	for _, proto := range recProtos {
		for _, tt := range tests {
			t.Run(proto.name+"/"+tt.name, func(t *testing.T) {
				h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 10}, tt.handler)
				resp, body := h.get(t, proto.h2)
				o := h.outcome(t)

				assert.Equal(t, tt.status, resp.StatusCode, "client status")
				assert.Equal(t, tt.body, string(body), "client body")
				assert.Equal(t, tt.status, o.status, "recorded status")
				assert.Equal(t, tt.body, string(o.body), "recorded body")
				assert.Equal(t, tt.wrote, o.wroteHeader)
				// Later WriteHeader calls were swallowed, not forwarded.
				assert.NotContains(t, h.logs.String(), "superfluous")
			})
		}
	}
}

func TestRecorderInvalidStatusPanics(t *testing.T) {
	for _, code := range []int{0, 99, 1000} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			rec := newRecorder(httptest.NewRecorder(), 10)
			assert.PanicsWithValue(t, fmt.Sprintf("idempotency: invalid WriteHeader code %d", code), func() {
				rec.WriteHeader(code)
			})
			assert.False(t, rec.wrote)
			assert.Equal(t, http.StatusOK, rec.status())
		})
	}
}

func TestRecorderSnapshot(t *testing.T) {
	for _, proto := range recProtos {
		t.Run(proto.name, func(t *testing.T) {
			h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 10}, func(c *recCall) {
				hdr := c.rec.Header()
				hdr.Set("Content-Type", "application/json")
				hdr.Add("Vary", "Accept")
				hdr.Add("Vary", "Accept-Encoding, Origin")
				hdr.Set("X-Changed", "before")
				c.rec.WriteHeader(http.StatusCreated)

				// None of this may reach the snapshot.
				hdr.Set("X-Late", "late")
				hdr["X-Changed"][0] = "mutated in place"
				hdr["Vary"][1] = "mutated in place"
				hdr.Add("Content-Type", "text/plain")
				_, _ = c.rec.Write([]byte("{}"))
				c.vals["live"] = hdr
			})
			resp, body := h.get(t, proto.h2)
			o := h.outcome(t)

			assert.Equal(t, http.StatusCreated, resp.StatusCode)
			assert.Equal(t, "{}", string(body))
			assert.Equal(t, "before", resp.Header.Get("X-Changed"), "the client got the header as written")

			want := http.Header{
				"Content-Type": {"application/json"},
				"Vary":         {"Accept", "Accept-Encoding, Origin"},
				"X-Changed":    {"before"},
			}
			assert.Equal(t, want, o.header)

			// The snapshot is the caller's: changing it does not touch the
			// writer's header.
			live := o.vals["live"].(http.Header)
			o.header["Vary"][0] = "changed by the caller"
			assert.Equal(t, "Accept", live["Vary"][0])
		})
	}
}

func TestRecorderSnapshotWhenNothingWritten(t *testing.T) {
	h := recServe(t, recOptions{maxBody: 10}, func(c *recCall) {
		c.rec.Header().Set("X-Set", "1")
		c.rec.Header().Set("X-Deleted", "1")
		c.rec.Header().Del("X-Deleted")
	})
	resp, _ := h.get(t, false)
	o := h.outcome(t)

	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.False(t, o.wroteHeader)
	assert.Equal(t, http.StatusOK, o.status)
	assert.Equal(t, http.Header{"X-Set": {"1"}}, o.header)
}

func TestRecorderInformational(t *testing.T) {
	const link = "</style.css>; rel=preload; as=style"
	for _, proto := range recProtos {
		t.Run(proto.name, func(t *testing.T) {
			h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 10}, func(c *recCall) {
				c.rec.Header().Set("Link", link)
				c.rec.WriteHeader(http.StatusEarlyHints)
				c.vals["wroteAfter1xx"] = c.rec.wrote
				c.vals["statusAfter1xx"] = c.rec.status()
				c.vals["beforeAfter1xx"] = len(c.events)
				c.rec.Header().Del("Link")
				c.rec.Header().Set("X-Final", "yes")
				c.rec.WriteHeader(http.StatusCreated)
				_, _ = c.rec.Write([]byte("done"))
			})

			var mu sync.Mutex
			var got []int
			var gotLink []string
			trace := &httptrace.ClientTrace{
				Got1xxResponse: func(code int, hdr textproto.MIMEHeader) error {
					mu.Lock()
					defer mu.Unlock()
					got = append(got, code)
					gotLink = append(gotLink, hdr.Get("Link"))
					return nil
				},
			}
			req, err := http.NewRequestWithContext(
				httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, h.srv.URL, nil)
			require.NoError(t, err)
			resp, body := h.do(t, proto.h2, req)
			o := h.outcome(t)

			mu.Lock()
			assert.Equal(t, []int{http.StatusEarlyHints}, got, "the client got the 103")
			assert.Equal(t, []string{link}, gotLink)
			mu.Unlock()
			assert.Equal(t, http.StatusCreated, resp.StatusCode)
			assert.Equal(t, "done", string(body))

			assert.Equal(t, false, o.vals["wroteAfter1xx"], "1xx is not final")
			assert.Equal(t, http.StatusOK, o.vals["statusAfter1xx"], "1xx is not the status")
			assert.Equal(t, http.StatusCreated, o.status)
			assert.Equal(t, http.Header{"X-Final": {"yes"}}, o.header)
			assert.Equal(t, "done", string(o.body))
		})
	}
}

func TestRecorderSwitchingProtocolsIsFinal(t *testing.T) {
	w := httptest.NewRecorder()
	rec := newRecorder(w, 10)
	rec.WriteHeader(http.StatusSwitchingProtocols)
	rec.WriteHeader(http.StatusOK)

	assert.True(t, rec.wrote)
	assert.Equal(t, http.StatusSwitchingProtocols, rec.status())
	assert.Equal(t, http.StatusSwitchingProtocols, w.Code)
}

func TestRecorderFlushStreams(t *testing.T) {
	for _, proto := range recProtos {
		for _, method := range []string{"Flush", "FlushError", "ResponseController"} {
			t.Run(proto.name+"/"+method, func(t *testing.T) {
				proceed := make(chan struct{})
				h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 10}, func(c *recCall) {
					c.rec.WriteHeader(http.StatusAccepted)
					_, _ = c.rec.Write([]byte("first;"))
					var err error
					switch method {
					case "Flush":
						c.rec.Flush()
					case "FlushError":
						err = c.rec.FlushError()
					default:
						err = http.NewResponseController(c.rec).Flush()
					}
					c.errs = append(c.errs, err)
					select {
					case <-proceed:
						c.vals["streamed"] = true
					case <-time.After(recWait):
						c.vals["streamed"] = false
					}
					_, _ = c.rec.Write([]byte("second"))
				})

				resp, err := h.srv.Client().Get(h.srv.URL)
				require.NoError(t, err)
				defer resp.Body.Close()
				assert.Equal(t, http.StatusAccepted, resp.StatusCode)
				first := make([]byte, len("first;"))
				_, err = io.ReadFull(resp.Body, first)
				require.NoError(t, err)
				assert.Equal(t, "first;", string(first))
				close(proceed) // only now may the handler go on
				rest, err := io.ReadAll(resp.Body)
				require.NoError(t, err)
				assert.Equal(t, "second", string(rest))

				o := h.outcome(t)
				assert.Equal(t, true, o.vals["streamed"], "the flushed bytes reached the client before the handler returned")
				assert.Equal(t, []error{nil}, o.errs)
				assert.Equal(t, http.StatusAccepted, o.status)
				assert.Equal(t, "first;second", string(o.body))
			})
		}
	}
}

// recPlainWriter is a ResponseWriter with no optional interface at all.
type recPlainWriter struct {
	hdr  http.Header
	code int
	buf  bytes.Buffer
}

func (w *recPlainWriter) Header() http.Header {
	if w.hdr == nil {
		w.hdr = http.Header{}
	}
	return w.hdr
}

func (w *recPlainWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
}

func (w *recPlainWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.buf.Write(p)
}

func (w *recPlainWriter) WriteString(s string) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.buf.WriteString(s)
}

func TestRecorderUnsupportedCapabilities(t *testing.T) {
	w := &recPlainWriter{}
	rec := newRecorder(w, 10)

	_, _, err := rec.Hijack()
	assert.ErrorIs(t, err, http.ErrNotSupported)
	assert.False(t, rec.hijacked)

	assert.ErrorIs(t, http.NewResponseController(rec).EnableFullDuplex(), http.ErrNotSupported)

	// Flush still sends the implied header, even where flushing itself is
	// not supported, so the first response and the replay agree.
	assert.ErrorIs(t, rec.FlushError(), http.ErrNotSupported)
	rec.Flush()
	assert.True(t, rec.wrote)
	assert.Equal(t, http.StatusOK, w.code)
	assert.Equal(t, http.StatusOK, rec.status())
	assert.Same(t, http.ResponseWriter(w), rec.Unwrap())
}

func TestRecorderHijack(t *testing.T) {
	t.Run("HTTP/1.1", func(t *testing.T) {
		h := recServe(t, recOptions{maxBody: 1 << 10}, func(c *recCall) {
			conn, brw, err := c.rec.Hijack()
			c.errs = append(c.errs, err)
			if err != nil {
				return
			}
			defer conn.Close()
			c.vals["wroteAfterHijack"] = c.rec.wrote
			_, _ = brw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nraw ok")
			c.errs = append(c.errs, brw.Flush())
		})
		resp, body := h.get(t, false)
		o := h.outcome(t)

		assert.Equal(t, []error{nil, nil}, o.errs)
		assert.Equal(t, http.StatusOK, resp.StatusCode)
		assert.Equal(t, "raw ok", string(body))
		assert.True(t, o.hijacked)
		assert.Equal(t, false, o.vals["wroteAfterHijack"])
		assert.False(t, o.wroteHeader)
		assert.Empty(t, o.body)
	})
	t.Run("HTTP/2", func(t *testing.T) {
		h := recServe(t, recOptions{h2: true, maxBody: 1 << 10}, func(c *recCall) {
			_, _, err := c.rec.Hijack()
			c.errs = append(c.errs, err)
			c.rec.WriteHeader(http.StatusCreated)
			_, _ = c.rec.Write([]byte("not hijacked"))
		})
		resp, body := h.get(t, true)
		o := h.outcome(t)

		require.Len(t, o.errs, 1)
		assert.ErrorIs(t, o.errs[0], http.ErrNotSupported)
		assert.False(t, o.hijacked)
		assert.Equal(t, http.StatusCreated, resp.StatusCode)
		assert.Equal(t, "not hijacked", string(body))
		assert.Equal(t, http.StatusCreated, o.status)
		assert.Equal(t, "not hijacked", string(o.body))
	})
}

func TestRecorderHasNoReadFrom(t *testing.T) {
	var rec any = &recorder{}
	_, ok := rec.(io.ReaderFrom)
	assert.False(t, ok, "io.Copy must go through Write to be captured")
}

func TestRecorderIOCopy(t *testing.T) {
	data := make([]byte, 300<<10)
	_, err := rand.Read(data)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "payload")
	require.NoError(t, os.WriteFile(path, data, 0o600))

	sources := []struct {
		name string
		open func() (io.Reader, func(), error)
	}{
		{"plain reader", func() (io.Reader, func(), error) {
			return struct{ io.Reader }{bytes.NewReader(data)}, func() {}, nil
		}},
		{"os.File", func() (io.Reader, func(), error) {
			f, err := os.Open(path)
			if err != nil {
				return nil, nil, err
			}
			return f, func() { f.Close() }, nil
		}},
		{"bytes.Reader", func() (io.Reader, func(), error) { return bytes.NewReader(data), func() {}, nil }},
	}
	for _, proto := range recProtos {
		for _, src := range sources {
			for _, status := range []int{0, http.StatusCreated} {
				t.Run(fmt.Sprintf("%s/%s/status %d", proto.name, src.name, status), func(t *testing.T) {
					h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 20}, func(c *recCall) {
						r, done, err := src.open()
						if err != nil {
							c.errs = append(c.errs, err)
							return
						}
						defer done()
						if status != 0 {
							c.rec.WriteHeader(status)
						}
						n, err := io.Copy(c.rec, r)
						c.errs = append(c.errs, err)
						c.vals["n"] = n
					})
					resp, body := h.get(t, proto.h2)
					o := h.outcome(t)

					want := status
					if want == 0 {
						want = http.StatusOK
					}
					assert.Equal(t, []error{nil}, o.errs)
					assert.Equal(t, int64(len(data)), o.vals["n"])
					assert.Equal(t, want, resp.StatusCode)
					assert.True(t, bytes.Equal(data, body), "client body")
					assert.Equal(t, want, o.status)
					assert.True(t, bytes.Equal(data, o.body), "captured body")
					assert.False(t, o.overflowed)
				})
			}
		}
	}
}

func TestRecorderClientDisconnect(t *testing.T) {
	for _, proto := range recProtos {
		t.Run(proto.name, func(t *testing.T) {
			h := recServe(t, recOptions{h2: proto.h2, maxBody: 16 << 20}, func(c *recCall) {
				var sent bytes.Buffer
				write := func(p []byte) error {
					sent.Write(p)
					n, err := c.rec.Write(p)
					if err == nil && n != len(p) {
						err = io.ErrShortWrite
					}
					return err
				}
				c.rec.WriteHeader(http.StatusCreated)
				_ = write([]byte("hello;"))
				c.rec.Flush()

				select {
				case <-c.r.Context().Done():
				case <-time.After(recWait):
					c.errs = append(c.errs, errors.New("client did not go away"))
					return
				}
				// Write until the server reports the client is gone (the
				// kernel may absorb some writes first), then a few more.
				chunk := bytes.Repeat([]byte("0123456789abcdef"), 1<<10)
				var failed error
				for i := 0; i < 500 && failed == nil; i++ {
					chunk[0] = byte('A' + i%26)
					if failed = write(chunk); failed == nil {
						failed = c.rec.FlushError()
					}
				}
				c.vals["failed"] = failed
				_ = write([]byte("after the failure;"))
				_ = write([]byte("and the end"))
				c.vals["sent"] = sent.Bytes()
			})

			resp, err := h.srv.Client().Get(h.srv.URL)
			require.NoError(t, err)
			first := make([]byte, len("hello;"))
			_, err = io.ReadFull(resp.Body, first)
			require.NoError(t, err)
			assert.Equal(t, "hello;", string(first))
			require.NoError(t, resp.Body.Close()) // the client goes away mid-response

			o := h.outcome(t)
			require.Empty(t, o.errs)
			assert.Error(t, o.vals["failed"].(error), "writing to a gone client failed")
			sent := o.vals["sent"].([]byte)
			assert.True(t, bytes.HasSuffix(sent, []byte("after the failure;and the end")))
			assert.Equal(t, len(sent), len(o.body))
			assert.True(t, bytes.Equal(sent, o.body), "every byte the handler wrote is captured")
			assert.Equal(t, http.StatusCreated, o.status)
			assert.False(t, o.overflowed)
		})
	}
}

func TestRecorderOverflow(t *testing.T) {
	tests := []struct {
		name     string
		maxBody  int
		writes   []int
		over     bool
		captured int
	}{
		{"exactly the cap", 10, []int{4, 6}, false, 10},
		{"one byte over", 10, []int{4, 6, 1}, true, 10},
		{"second write crosses", 10, []int{6, 6}, true, 6},
		{"first write crosses", 10, []int{11}, true, 0},
		{"zero cap, no body", 0, nil, false, 0},
		{"zero cap, a byte", 0, []int{1}, true, 0},
		{"negative cap counts as zero", -5, []int{1}, true, 0},
		{"many small writes", 1000, recRepeat(7, 300), true, 994},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var want bytes.Buffer
			h := recServe(t, recOptions{maxBody: tt.maxBody}, func(c *recCall) {
				c.rec.WriteHeader(http.StatusOK)
				for i, n := range tt.writes {
					_, err := c.rec.Write(bytes.Repeat([]byte{byte('a' + i%26)}, n))
					if err != nil {
						c.errs = append(c.errs, err)
					}
				}
				c.vals["cap"] = cap(c.rec.buf)
			})
			for i, n := range tt.writes {
				want.Write(bytes.Repeat([]byte{byte('a' + i%26)}, n))
			}
			_, body := h.get(t, false)
			o := h.outcome(t)

			assert.Empty(t, o.errs)
			assert.True(t, bytes.Equal(want.Bytes(), body), "the client gets the whole body")
			assert.Equal(t, tt.over, o.overflowed)
			assert.Equal(t, tt.captured, len(o.body))
			assert.True(t, bytes.HasPrefix(want.Bytes(), o.body), "what is captured is a prefix")
			assert.LessOrEqual(t, o.vals["cap"].(int), max(tt.maxBody, 0), "the buffer never grows past the cap")
		})
	}
}

// recRepeat returns n copies of v.
func recRepeat(v, n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = v
	}
	return s
}

func TestRecorderRefusedBytes(t *testing.T) {
	// HTTP/1.1 refuses a write that crosses the declared Content-Length;
	// HTTP/2 accepts it while the header is unsent and its client drops
	// the excess. Either way, only what the client can get is captured.
	tests := []struct {
		name    string
		handler func(c *recCall)
		body    [2]string // what the client gets and what is captured: HTTP/1.1, HTTP/2
		failed  [2]int    // writes the server refused: HTTP/1.1, HTTP/2
		refused error     // what HTTP/1.1 refuses them with
	}{
		{
			name: "Content-Length too short",
			handler: func(c *recCall) {
				c.rec.Header().Set("Content-Length", "5")
				for _, s := range []string{"hel", "lo world", "!"} {
					if _, err := c.rec.Write([]byte(s)); err != nil {
						c.errs = append(c.errs, err)
					}
				}
			},
			body: [2]string{"hel", "hello"}, failed: [2]int{2, 0}, refused: http.ErrContentLength,
		},
		{
			name: "Content-Length exact then more",
			handler: func(c *recCall) {
				c.rec.Header().Set("Content-Length", "5")
				c.rec.WriteHeader(http.StatusCreated)
				for _, s := range []string{"hello", "!"} {
					if _, err := io.WriteString(c.rec, s); err != nil {
						c.errs = append(c.errs, err)
					}
				}
			},
			body: [2]string{"hello", "hello"}, failed: [2]int{1, 0}, refused: http.ErrContentLength,
		},
		{
			name: "status without a body",
			handler: func(c *recCall) {
				c.rec.WriteHeader(http.StatusNotModified)
				if _, err := c.rec.Write([]byte("ignored")); err != nil {
					c.errs = append(c.errs, err)
				}
			},
			failed: [2]int{1, 1}, refused: http.ErrBodyNotAllowed,
		},
	}
	for i, proto := range recProtos {
		for _, tt := range tests {
			t.Run(proto.name+"/"+tt.name, func(t *testing.T) {
				h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 10}, tt.handler)
				resp, err := h.srv.Client().Get(h.srv.URL)
				require.NoError(t, err)
				// A short body may end in an error: only the bytes matter.
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				o := h.outcome(t)

				assert.Equal(t, tt.body[i], string(body), "client body")
				assert.Equal(t, tt.body[i], string(o.body), "only what the client can get is captured")
				require.Len(t, o.errs, tt.failed[i], "the handler sees the server's refusals")
				if !proto.h2 {
					for _, err := range o.errs {
						assert.ErrorIs(t, err, tt.refused)
					}
				}
			})
		}
	}
}

func TestRecorderDeadlinesThroughUnwrap(t *testing.T) {
	for _, proto := range recProtos {
		t.Run(proto.name, func(t *testing.T) {
			h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 10}, func(c *recCall) {
				rc := http.NewResponseController(c.rec)
				c.errs = append(c.errs, rc.SetWriteDeadline(time.Now().Add(time.Minute)))
				c.errs = append(c.errs, rc.SetReadDeadline(time.Now().Add(-time.Second)))
				// The client never finishes its body: only the deadline the
				// recorder passed on can end this read.
				_, err := io.ReadAll(c.r.Body)
				c.vals["readErr"] = err
				c.rec.WriteHeader(http.StatusRequestTimeout)
			})

			pr, pw := io.Pipe()
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			clientDone := make(chan struct{})
			t.Cleanup(func() {
				cancel()
				pw.Close()
				<-done
				<-clientDone
			})
			go func() {
				defer close(done)
				_, _ = pw.Write([]byte("partial"))
			}()
			go func() {
				defer close(clientDone)
				req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.srv.URL, pr)
				if err != nil {
					return
				}
				if resp, err := h.srv.Client().Do(req); err == nil {
					resp.Body.Close()
				}
			}()

			o := h.outcome(t)
			assert.Equal(t, []error{nil, nil}, o.errs, "the deadlines reached the connection")
			readErr, _ := o.vals["readErr"].(error)
			require.Error(t, readErr)
			if !proto.h2 {
				assert.ErrorIs(t, readErr, os.ErrDeadlineExceeded)
			}
		})
	}
}

func TestRecorderWriteDeadlineThroughUnwrap(t *testing.T) {
	h := recServe(t, recOptions{maxBody: 1 << 20}, func(c *recCall) {
		c.rec.WriteHeader(http.StatusOK)
		c.rec.Flush()
		rc := http.NewResponseController(c.rec)
		c.errs = append(c.errs, rc.SetWriteDeadline(time.Now().Add(-time.Second)))
		_, err := c.rec.Write(bytes.Repeat([]byte("x"), 64<<10))
		if err == nil {
			err = c.rec.FlushError()
		}
		c.vals["writeErr"] = err
	})
	resp, err := h.srv.Client().Get(h.srv.URL)
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	o := h.outcome(t)

	assert.Equal(t, []error{nil}, o.errs)
	writeErr, _ := o.vals["writeErr"].(error)
	assert.ErrorIs(t, writeErr, os.ErrDeadlineExceeded)
	assert.Equal(t, 64<<10, len(o.body), "bytes a failed write carried are still captured")
}

func TestRecorderEnableFullDuplex(t *testing.T) {
	for _, proto := range recProtos {
		t.Run(proto.name, func(t *testing.T) {
			h := recServe(t, recOptions{h2: proto.h2, maxBody: 1 << 10}, func(c *recCall) {
				c.errs = append(c.errs, http.NewResponseController(c.rec).EnableFullDuplex())
				// Full duplex: read the body after the response started.
				c.rec.WriteHeader(http.StatusOK)
				c.rec.Flush()
				b, err := io.ReadAll(c.r.Body)
				c.errs = append(c.errs, err)
				_, _ = c.rec.Write(b)
			})
			req, err := http.NewRequest(http.MethodPost, h.srv.URL, strings.NewReader("echo me"))
			require.NoError(t, err)
			_, body := h.do(t, proto.h2, req)
			o := h.outcome(t)

			assert.Equal(t, []error{nil, nil}, o.errs)
			assert.Equal(t, "echo me", string(body))
			assert.Equal(t, "echo me", string(o.body))
		})
	}
}

func TestRecorderWriteAfterHijack(t *testing.T) {
	h := recServe(t, recOptions{maxBody: 1 << 10}, func(c *recCall) {
		conn, _, err := c.rec.Hijack()
		if err != nil {
			c.errs = append(c.errs, err)
			return
		}
		defer conn.Close()
		_, err = c.rec.Write([]byte("too late"))
		c.vals["writeErr"] = err
		_, _ = io.WriteString(conn, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
	})
	resp, _ := h.get(t, false)
	o := h.outcome(t)

	assert.Empty(t, o.errs)
	assert.Equal(t, http.StatusNoContent, resp.StatusCode)
	writeErr, _ := o.vals["writeErr"].(error)
	assert.ErrorIs(t, writeErr, http.ErrHijacked)
	assert.True(t, o.hijacked)
	assert.False(t, o.wroteHeader)
	assert.Empty(t, o.body)
}

// recFlushWriter is a recPlainWriter that can flush.
type recFlushWriter struct {
	recPlainWriter
	flushes int
}

func (w *recFlushWriter) Flush() { w.flushes++ }

func TestRecorderWriteAllocations(t *testing.T) {
	rw := &recFlushWriter{}
	rec := newRecorder(rw, 1<<20)
	rec.WriteHeader(http.StatusCreated)
	p := []byte("0123456789")
	_, _ = rec.Write(p) // the first capture allocates the buffer
	rw.buf.Grow(1 << 16)
	allocs := testing.AllocsPerRun(100, func() {
		_, _ = rec.Write(p)
		_, _ = rec.WriteString("abc")
		rec.Flush()
	})
	assert.Zero(t, allocs, "steady-state writes and flushes")
	assert.Equal(t, 101, rw.flushes)
}

// BenchmarkRecorder measures a recorder through a small response.
func BenchmarkRecorder(b *testing.B) {
	w := httptest.NewRecorder()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", "/orders/1")
	body := []byte(`{"id":1,"status":"created"}`)
	b.ReportAllocs()
	for b.Loop() {
		w.Body.Reset()
		w.Code, w.Flushed = 0, false
		rec := newRecorder(w, 1<<20)
		rec.WriteHeader(http.StatusCreated)
		_, _ = rec.Write(body)
		_ = rec.header()
	}
}

var _ interface {
	http.ResponseWriter
	http.Flusher
	http.Hijacker
	io.StringWriter
	FlushError() error
	Unwrap() http.ResponseWriter
} = (*recorder)(nil)
