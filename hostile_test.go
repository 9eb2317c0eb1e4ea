package idempotency_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// These tests play clients that try to hurt the server: huge keys, floods
// of unique keys, huge and slow bodies, and keys that look alike.

// hostileServer is a handler behind the middleware on a test server.
type hostileServer struct {
	srv    *httptest.Server
	store  *idempotency.MemoryStore
	runs   atomic.Int64
	events *faultEvents
}

// hostileServe serves h behind New(cfg) with cfg.Store (a memory store
// made here when nil). configure, when not nil, adjusts the http.Server
// before it starts.
func hostileServe(t *testing.T, cfg idempotency.Config, h http.HandlerFunc, configure func(*http.Server)) *hostileServer {
	t.Helper()
	hs := &hostileServer{events: &faultEvents{}}
	if cfg.Store == nil {
		hs.store = idempotency.NewMemoryStore()
		cfg.Store = hs.store
	}
	cfg.Observer = hs.events.observe
	hs.srv = httptest.NewUnstartedServer(idempotency.New(cfg)(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hs.runs.Add(1)
		h(w, r)
	})))
	if configure != nil {
		configure(hs.srv.Config)
	}
	hs.srv.Start()
	t.Cleanup(hs.srv.Close)
	hs.srv.Client().Timeout = 30 * time.Second
	return hs
}

// hostileOK answers 201 with the key the handler saw.
func hostileOK(w http.ResponseWriter, r *http.Request) {
	key, _ := idempotency.KeyFromContext(r.Context())
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"key":%q}`, key)
}

// hostilePost sends a POST with the given key header value and body.
func hostilePost(t *testing.T, hs *hostileServer, key string, body io.Reader) faultResult {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, hs.srv.URL+"/orders", body)
	require.NoError(t, err)
	req.Header.Set("Idempotency-Key", key)
	resp, err := hs.srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return faultResult{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

// hostileHeap returns the live heap after a collection.
func hostileHeap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestHostileHugeKey: a 64 KiB key fits in net/http's default header
// limit (http.DefaultMaxHeaderBytes, 1 MB), so it reaches the middleware,
// which answers 400 without touching the store or echoing the key. A key
// header beyond the server's MaxHeaderBytes never reaches the middleware:
// net/http itself answers 431 Request Header Fields Too Large.
func TestHostileHugeKey(t *testing.T) {
	faultNoLeak(t)
	key := strings.Repeat("k", 64<<10)

	hs := hostileServe(t, idempotency.Config{}, hostileOK, nil)
	r := hostilePost(t, hs, key, strings.NewReader(`{}`))
	assert.Equal(t, http.StatusBadRequest, r.status)
	var p idempotency.Problem
	require.NoError(t, json.Unmarshal([]byte(r.body), &p))
	assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyInvalid, p.Type)
	assert.Contains(t, p.Detail, "at most 255 characters")
	assert.NotContains(t, r.body, strings.Repeat("k", 256), "the key is not echoed")
	assert.Less(t, len(r.body), 1024)
	assert.Zero(t, hs.runs.Load())
	assert.Zero(t, hs.store.Len(), "an invalid key never reaches the store")
	assert.Equal(t, 1, hs.events.count(idempotency.OutcomeKeyInvalid))

	small := hostileServe(t, idempotency.Config{}, hostileOK, func(s *http.Server) { s.MaxHeaderBytes = 4 << 10 })
	r = hostilePost(t, small, key, strings.NewReader(`{}`))
	assert.Equal(t, http.StatusRequestHeaderFieldsTooLarge, r.status, "net/http refuses the header first")
	assert.Zero(t, small.runs.Load())
	assert.Empty(t, small.events.all, "the middleware never saw the request")
	assert.Zero(t, small.store.Len())
}

// hostileClock is a clock for a memory store that the test moves by hand.
type hostileClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *hostileClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *hostileClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// hostileFlood sends n requests with distinct keys (series-1 to series-n)
// from a few goroutines straight into h, as fast as the middleware takes
// them, and counts the statuses.
func hostileFlood(h http.Handler, series string, n int) map[int]int {
	const workers = 8
	var mu sync.Mutex
	statuses := map[int]int{}
	var wg sync.WaitGroup
	var next atomic.Int64
	for range workers {
		wg.Go(func() {
			local := map[int]int{}
			for {
				i := next.Add(1)
				if i > int64(n) {
					break
				}
				req := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(`{}`))
				req.Header.Set("Idempotency-Key", series+"-"+strconv.FormatInt(i, 10))
				w := httptest.NewRecorder()
				h.ServeHTTP(w, req)
				local[w.Code]++
			}
			mu.Lock()
			for code, c := range local {
				statuses[code] += c
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	return statuses
}

// TestHostileUniqueKeyFlood: one client sends 10,000 requests with
// distinct keys in a burst (in process, so the burst is as fast as the
// middleware). Nothing fails; the store holds one record per live key and
// drops expired ones as new keys come in; at its cap it refuses new keys
// with 503 rather than evicting; the heap stays bounded.
func TestHostileUniqueKeyFlood(t *testing.T) {
	faultNoLeak(t)
	const n = 10_000
	var runs atomic.Int64
	handler := func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		hostileOK(w, r)
	}

	t.Run("records expire", func(t *testing.T) {
		runs.Store(0)
		clock := &hostileClock{now: time.Now()}
		store := idempotency.NewMemoryStore(idempotency.WithTestClock(clock.Now))
		h := idempotency.New(idempotency.Config{Store: store, TTL: time.Hour})(http.HandlerFunc(handler))

		before := hostileHeap()
		assert.Equal(t, map[int]int{http.StatusCreated: n}, hostileFlood(h, "a", n))
		assert.EqualValues(t, n, runs.Load())
		assert.Equal(t, n, store.Len(), "one record per key, nothing more")
		heap := hostileHeap()
		t.Logf("heap %d KiB before, %d KiB after %d keys", before>>10, heap>>10, n)
		assert.Less(t, int64(heap)-int64(before), int64(64<<20), "the heap grows with the records only")

		// Once the TTL is over, expired records go as new keys come in.
		clock.advance(time.Hour + time.Second)
		assert.Equal(t, map[int]int{http.StatusCreated: n / 2}, hostileFlood(h, "b", n/2))
		t.Logf("store holds %d records after a second flood of %d keys, the first %d expired", store.Len(), n/2, n)
		assert.Less(t, store.Len(), n, "expired records were swept inline as new keys came in")
		runtime.KeepAlive(h)
	})
	t.Run("store at its cap", func(t *testing.T) {
		runs.Store(0)
		const capacity, sent = 1_000, 4_000
		events := &faultEvents{}
		store := idempotency.NewMemoryStore(idempotency.WithMaxEntries(capacity))
		h := idempotency.New(idempotency.Config{Store: store, Observer: events.observe})(http.HandlerFunc(handler))
		statuses := hostileFlood(h, "c", sent)
		assert.Equal(t, capacity, statuses[http.StatusCreated], "live records are never evicted")
		assert.Equal(t, sent-capacity, statuses[http.StatusServiceUnavailable], "new keys are refused at the cap")
		assert.Len(t, statuses, 2)
		assert.EqualValues(t, capacity, runs.Load())
		assert.Equal(t, capacity, store.Len())
		assert.Equal(t, sent-capacity, events.count(idempotency.OutcomeStoreFull))
	})
}

// hostileBody is a request body of left bytes, generated as it is read:
// byte i is hostilePattern[(i+shift) % len(hostilePattern)].
type hostileBody struct {
	left  int64
	off   int
	shift int
}

// hostilePattern is what hostileBody repeats: 4 KiB whose period is not
// a power of two.
var hostilePattern = func() []byte {
	b := make([]byte, 4093)
	for i := range b {
		b[i] = 'a' + byte(i%26)
	}
	return b
}()

func (b *hostileBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), b.left)]
	n := 0
	for n < len(p) {
		i := (b.off + b.shift) % len(hostilePattern)
		c := copy(p[n:], hostilePattern[i:])
		n += c
		b.off = (b.off + c) % len(hostilePattern)
	}
	b.left -= int64(n)
	return n, nil
}

// hostileHeapPeak samples the heap in use until stop is closed and returns
// the highest value seen.
func hostileHeapPeak(stop <-chan struct{}) <-chan uint64 {
	out := make(chan uint64, 1)
	go func() {
		var peak uint64
		var m runtime.MemStats
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapAlloc)
			select {
			case <-stop:
				out <- peak
				return
			case <-tick.C:
			}
		}
	}()
	return out
}

// TestHostileHugeBody streams 100 MB through the middleware to a handler
// that discards it. The middleware hashes the first
// FingerprintBodyLimit bytes as they go by and buffers nothing else, so
// the heap grows far less than the body; the retry with the same key and
// the same body matches the fingerprint and gets the replay.
func TestHostileHugeBody(t *testing.T) {
	faultNoLeak(t)
	const size = 100 << 20
	var read atomic.Int64
	hs := hostileServe(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		read.Store(n)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		hostileOK(w, r)
	}, nil)

	before := hostileHeap()
	stop := make(chan struct{})
	peak := hostileHeapPeak(stop)
	req, err := http.NewRequest(http.MethodPost, hs.srv.URL+"/orders", &hostileBody{left: size})
	require.NoError(t, err)
	req.ContentLength = size
	req.Header.Set("Idempotency-Key", "upload-1")
	resp, err := hs.srv.Client().Do(req)
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	close(stop)
	growth := int64(<-peak) - int64(before)
	t.Logf("heap peak grew by %d KiB while 100 MB went through", growth>>10)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.EqualValues(t, size, read.Load(), "the handler read the whole body")
	assert.Less(t, growth, int64(32<<20), "the body was buffered")

	// The retry sends the same 100 MB: the middleware hashes the first
	// MiB, matches, and replays without running the handler.
	retry := hostilePost(t, hs, "upload-1", &hostileBody{left: size})
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.Equal(t, "true", retry.header.Get(idempotency.ReplayedHeader))
	assert.EqualValues(t, 1, hs.runs.Load())

	// A body that differs within the first MiB is a different request.
	other := &hostileBody{left: size, shift: 1}
	assert.Equal(t, http.StatusUnprocessableEntity, hostilePost(t, hs, "upload-1", other).status)
}

// hostileLoris opens a connection, sends a keyed request's header that
// announces a body of 1000 bytes, sends a few of them and stalls. It
// returns the connection; the caller closes it.
func hostileLoris(t *testing.T, hs *hostileServer, key string) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", hs.srv.Listener.Addr().String())
	require.NoError(t, err)
	_, err = fmt.Fprintf(conn, "POST /orders HTTP/1.1\r\nHost: test\r\nIdempotency-Key: %s\r\n"+
		"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"amount\":", key)
	require.NoError(t, err)
	return conn
}

// TestHostileSlowLoris: a keyed request whose body stalls after a few
// bytes. The server's ReadTimeout ends the body read; the claim is released
// (a 408, which is not stored) or completed, never left in flight, so a
// later request with the key runs or replays at once, and no goroutine is
// left behind. Without a ReadTimeout (or a body deadline set through
// http.ResponseController) a stalled body holds the handler, and with it
// the renewed claim, as long as the client keeps the connection open: set
// one on every server.
func TestHostileSlowLoris(t *testing.T) {
	faultNoLeak(t)
	const lockTTL = 300 * time.Millisecond
	const readTimeout = 300 * time.Millisecond
	tests := []struct {
		name    string
		handler http.HandlerFunc
		// want is the status the loris gets, and whether its key is then
		// completed (replayed) rather than released.
		want      int
		completed bool
	}{
		{
			name: "handler reads the body",
			handler: func(w http.ResponseWriter, r *http.Request) {
				if _, err := io.ReadAll(r.Body); err != nil {
					w.WriteHeader(http.StatusRequestTimeout)
					return
				}
				hostileOK(w, r)
			},
			want: http.StatusRequestTimeout,
		},
		{
			// The middleware reads ahead the first bytes of the body
			// before the response header goes out; the read ends with
			// the ReadTimeout too. The fingerprint could not be taken, so
			// the record is kept with one that matches no request: a
			// retry gets 422, never another request's response and never
			// a second run.
			name:      "handler ignores the body",
			handler:   hostileOK,
			want:      http.StatusCreated,
			completed: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var done atomic.Int64
			hs := hostileServe(t, idempotency.Config{LockTTL: lockTTL}, func(w http.ResponseWriter, r *http.Request) {
				defer done.Add(1)
				tt.handler(w, r)
			}, func(s *http.Server) { s.ReadTimeout = readTimeout })

			start := time.Now()
			conn := hostileLoris(t, hs, "loris")
			defer conn.Close()
			require.NoError(t, conn.SetReadDeadline(time.Now().Add(10*time.Second)))
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			require.NoError(t, err, "the stalled request gets an answer")
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			assert.Equal(t, tt.want, resp.StatusCode)
			assert.Less(t, time.Since(start), 5*time.Second, "ReadTimeout bounds the stall")
			require.Eventually(t, func() bool { return done.Load() == 1 }, 5*time.Second, 5*time.Millisecond)

			// Nothing is left in flight.
			rec, err := hs.store.Get(context.Background(), idempotency.StorageKey("", "loris"))
			require.NoError(t, err)
			if tt.completed {
				require.NotNil(t, rec)
				assert.Equal(t, idempotency.StateCompleted, rec.State)
			} else {
				assert.Nil(t, rec, "the claim was released")
			}

			// A well-behaved client with the key is served at once.
			again := hostilePost(t, hs, "loris", strings.NewReader(`{"amount":1}`))
			assert.NotEqual(t, http.StatusConflict, again.status, "the key is not stuck")
			if tt.completed {
				assert.Equal(t, http.StatusUnprocessableEntity, again.status)
				assert.Empty(t, again.header.Get(idempotency.ReplayedHeader))
			} else {
				assert.Equal(t, http.StatusCreated, again.status)
			}
			assert.Less(t, time.Since(start), lockTTL+5*time.Second)
		})
	}
}

// hostileRawPost sends a request with a header line written byte for
// byte, so that nothing on the client side normalises it, and returns the
// status and the key the handler saw.
func hostileRawPost(t *testing.T, hs *hostileServer, headerLine string) (int, string) {
	t.Helper()
	conn, err := net.Dial("tcp", hs.srv.Listener.Addr().String())
	require.NoError(t, err)
	defer conn.Close()
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	_, err = fmt.Fprintf(conn, "POST /orders HTTP/1.1\r\nHost: test\r\n%s\r\nContent-Type: application/json\r\n"+
		"Content-Length: 2\r\nConnection: close\r\n\r\n{}", headerLine)
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	var body struct{ Key string }
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	if resp.StatusCode == http.StatusCreated {
		require.NoError(t, json.Unmarshal(b, &body))
	}
	return resp.StatusCode, body.Key
}

// TestHostileLookalikeKeys documents which header values are the same key:
//
//   - Keys are case-sensitive: "abc" and "ABC" are two keys.
//   - The quoted form is the same key as the bare one: abc and "abc" (and
//     "abc" with parameters, which are ignored) are one key; the bare
//     abc;v=1 is another key, since parameters count only after a quoted
//     string.
//   - Surrounding spaces and tabs are not part of the key: net/http trims
//     them from header values before the middleware sees them.
//   - The header name is case-insensitive, as every HTTP header name.
func TestHostileLookalikeKeys(t *testing.T) {
	faultNoLeak(t)
	hs := hostileServe(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		hostileOK(w, r)
	}, nil)

	steps := []struct {
		line     string
		replayed bool // the request replays an earlier one rather than running
		key      string
	}{
		{line: "Idempotency-Key: abc", key: "abc"},
		{line: "Idempotency-Key: ABC", key: "ABC"},
		{line: "Idempotency-Key: Abc", key: "Abc"},
		{line: `Idempotency-Key: "abc"`, replayed: true, key: "abc"},
		{line: `Idempotency-Key: "abc";v=1`, replayed: true, key: "abc"},
		{line: "Idempotency-Key: abc;v=1", key: "abc;v=1"},
		{line: "Idempotency-Key:    abc  \t", replayed: true, key: "abc"},
		{line: "Idempotency-Key:\tabc", replayed: true, key: "abc"},
		{line: "idempotency-key: abc", replayed: true, key: "abc"},
		{line: "IDEMPOTENCY-KEY: ABC", replayed: true, key: "ABC"},
	}
	runs := int64(0)
	for _, st := range steps {
		status, key := hostileRawPost(t, hs, st.line)
		assert.Equal(t, http.StatusCreated, status, st.line)
		assert.Equal(t, st.key, key, "%s: the key of the response", st.line)
		if !st.replayed {
			runs++
		}
		assert.Equal(t, runs, hs.runs.Load(), "%s: replayed=%v", st.line, st.replayed)
	}
	assert.Equal(t, 4, hs.store.Len(), "abc, ABC, Abc and abc;v=1")
}
