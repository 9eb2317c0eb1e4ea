package postgres_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

// orderHandler is the handler the middleware tests protect: it reads the
// body, counts its executions and answers 201 with a Location. A request
// to /slow waits until release is closed.
type orderHandler struct {
	runs    atomic.Int64
	entered chan struct{}
	release chan struct{}
}

func newOrderHandler() *orderHandler {
	return &orderHandler{entered: make(chan struct{}, 100), release: make(chan struct{})}
}

func (h *orderHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	n := h.runs.Add(1)
	if r.URL.Path == "/slow" {
		h.entered <- struct{}{}
		<-h.release
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", "/orders/"+strconv.FormatInt(n, 10))
	w.Header()["Link"] = []string{`</a>; rel="next", </b>; rel="last"`, `</c>; rel="first"`}
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"order":%d,"request":%q}`, n, body)
}

// post sends a POST with an Idempotency-Key to srv.
func post(t *testing.T, srv *httptest.Server, path, key, body string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, srv.URL+path, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

// problemType returns the "type" of a problem response body.
func problemType(t *testing.T, body string) string {
	t.Helper()
	var p struct {
		Type string `json:"type"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &p), "body %q", body)
	return p.Type
}

// TestMiddleware runs the middleware over HTTP on two instances, each with
// its own pool, sharing one table as two processes would: first
// execution, replay on the other instance, mismatch, conflict, and
// concurrent requests with one key that run the handler once.
func TestMiddleware(t *testing.T) {
	poolA := testPool(t)
	poolB := testPool(t)
	table := randomTable(t, poolA)
	storeA := postgres.NewStore(poolA, postgres.WithTable(table))
	storeB := postgres.NewStore(poolB, postgres.WithTable(table))
	require.NoError(t, storeA.Migrate(t.Context()))

	h := newOrderHandler()
	srvA := httptest.NewServer(idempotency.New(idempotency.Config{Store: storeA})(h))
	t.Cleanup(srvA.Close)
	srvB := httptest.NewServer(idempotency.New(idempotency.Config{Store: storeB})(h))
	t.Cleanup(srvB.Close)

	key := randomName("order-")
	first, firstBody := post(t, srvA, "/orders", key, `{"amount":10}`)
	assert.Equal(t, http.StatusCreated, first.StatusCode)
	assert.Empty(t, first.Header.Get(idempotency.ReplayedHeader))
	assert.Equal(t, int64(1), h.runs.Load())

	t.Run("Replay", func(t *testing.T) {
		resp, body := post(t, srvB, "/orders", key, `{"amount":10}`)
		assert.Equal(t, http.StatusCreated, resp.StatusCode)
		assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader))
		assert.Equal(t, firstBody, body)
		assert.Equal(t, first.Header.Get("Location"), resp.Header.Get("Location"))
		assert.Equal(t, first.Header.Values("Link"), resp.Header.Values("Link"))
		assert.Equal(t, int64(1), h.runs.Load(), "the handler did not run again")
	})

	t.Run("Mismatch", func(t *testing.T) {
		resp, body := post(t, srvA, "/orders", key, `{"amount":99}`)
		assert.Equal(t, http.StatusUnprocessableEntity, resp.StatusCode)
		assert.True(t, strings.HasSuffix(problemType(t, body), idempotency.ProblemKeyReused))
		assert.Equal(t, int64(1), h.runs.Load())
	})

	t.Run("Conflict", func(t *testing.T) {
		slowKey := randomName("slow-")
		done := make(chan int)
		go func() {
			req, _ := http.NewRequest(http.MethodPost, srvA.URL+"/slow", strings.NewReader("{}"))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Idempotency-Key", slowKey)
			resp, err := srvA.Client().Do(req)
			if err != nil {
				done <- 0
				return
			}
			resp.Body.Close()
			done <- resp.StatusCode
		}()
		<-h.entered
		resp, body := post(t, srvB, "/slow", slowKey, "{}")
		close(h.release)
		assert.Equal(t, http.StatusConflict, resp.StatusCode)
		assert.NotEmpty(t, resp.Header.Get("Retry-After"))
		assert.True(t, strings.HasSuffix(problemType(t, body), idempotency.ProblemInProgress))
		assert.Equal(t, http.StatusCreated, <-done)

		resp, _ = post(t, srvB, "/slow", slowKey, "{}")
		assert.Equal(t, http.StatusCreated, resp.StatusCode)
		assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader))
	})

	t.Run("ConcurrentOneKey", func(t *testing.T) {
		const requests = 40
		before := h.runs.Load()
		concurrentKey := randomName("concurrent-")
		statuses := make([]int, requests)
		var wg sync.WaitGroup
		for i := range statuses {
			srv := srvA
			if i%2 == 1 {
				srv = srvB
			}
			wg.Go(func() {
				req, _ := http.NewRequest(http.MethodPost, srv.URL+"/orders", strings.NewReader("{}"))
				req.Header.Set("Idempotency-Key", concurrentKey)
				resp, err := srv.Client().Do(req)
				if err != nil {
					return
				}
				resp.Body.Close()
				statuses[i] = resp.StatusCode
			})
		}
		wg.Wait()
		assert.Equal(t, before+1, h.runs.Load(), "the handler ran once")
		for _, s := range statuses {
			assert.Contains(t, []int{http.StatusCreated, http.StatusConflict}, s)
		}
	})
}

// TestRoundTrips counts, after the statements are prepared, what each kind
// of request sends on the pool: statements (a pgx QueryTracer) and network
// round trips (writes after reads on the connection). First execution 2
// (claim, complete), replay 1, conflict 1, in pgx's default query mode and
// in the two modes for poolers without prepared statements.
func TestRoundTrips(t *testing.T) {
	modes := []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol}
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) { testRoundTrips(t, mode) })
	}
}

func testRoundTrips(t *testing.T, mode pgx.QueryExecMode) {
	cfg := poolConfig(t)
	cfg.MaxConns = 1 // one connection, so the warm-up prepares everything on it
	cfg.ConnConfig.DefaultQueryExecMode = mode
	queries, trips := &queryCounter{}, &tripCounter{}
	cfg.ConnConfig.Tracer = queries
	cfg.ConnConfig.DialFunc = trips.dial
	pool := newPool(t, cfg)
	store := newStore(t, pool)
	h := idempotency.New(idempotency.Config{Store: store})(newOrderHandler())
	serve := func(key string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader("{}"))
		r.Header.Set("Idempotency-Key", key)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}

	// Warm up: the first use of each statement on a connection prepares it.
	warm := randomName("warm-")
	require.Equal(t, http.StatusCreated, serve(warm).Code)
	require.Equal(t, http.StatusCreated, serve(warm).Code)
	held := randomName("held-")
	rec, err := store.Claim(t.Context(), idempotency.StorageKey("", held), "held-by-another-request", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec)

	key := randomName("key-")
	cases := []struct {
		name          string
		key           string
		status        int
		replayed      bool
		queries, trip int64
	}{
		{"First", key, http.StatusCreated, false, 2, 2},
		{"Replay", key, http.StatusCreated, true, 1, 1},
		{"Conflict", held, http.StatusConflict, false, 1, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			q, n := queries.n.Load(), trips.n.Load()
			w := serve(c.key)
			assert.Equal(t, c.status, w.Code)
			assert.Equal(t, c.replayed, w.Header().Get(idempotency.ReplayedHeader) == "true")
			assert.Equal(t, c.queries, queries.n.Load()-q, "statements")
			assert.Equal(t, c.trip, trips.n.Load()-n, "network round trips")
		})
	}
}

// TestCorruptRowFailsClosed checks that a row the store cannot read is a
// 503 even under FailOpen, and the handler does not run.
func TestCorruptRowFailsClosed(t *testing.T) {
	pool := testPool(t)
	store := newStore(t, pool)
	key := randomName("corrupt-")
	_, err := pool.Exec(t.Context(), "INSERT INTO "+tableOf(t, store)+
		" (key, version, token, state, expires_at) VALUES ($1, 9, 'x', 2, now() + interval '1 hour')",
		idempotency.StorageKey("", key))
	require.NoError(t, err)

	h := newOrderHandler()
	srv := httptest.NewServer(idempotency.New(idempotency.Config{Store: store, FailOpen: true})(h))
	t.Cleanup(srv.Close)
	resp, body := post(t, srv, "/orders", key, "{}")
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.True(t, strings.HasSuffix(problemType(t, body), idempotency.ProblemStoreUnavailable))
	assert.Zero(t, h.runs.Load())
}

// TestStoreOutage checks that when PostgreSQL cannot be reached, the
// middleware answers 503 with Retry-After within StoreTimeout and does
// not run the handler: a closed port, a closed pool, and a server that
// accepts connections and never answers. It needs no database.
func TestStoreOutage(t *testing.T) {
	const storeTimeout = 300 * time.Millisecond

	closedPort := func(t *testing.T) *pgxpool.Pool {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := ln.Addr().String()
		require.NoError(t, ln.Close())
		return outagePool(t, addr)
	}
	closedPool := func(t *testing.T) *pgxpool.Pool {
		pool := outagePool(t, "127.0.0.1:1")
		pool.Close()
		return pool
	}
	silent := func(t *testing.T) *pgxpool.Pool {
		return outagePool(t, silentServer(t))
	}
	cases := []struct {
		name string
		pool func(t *testing.T) *pgxpool.Pool
	}{
		{"ClosedPort", closedPort},
		{"ClosedPool", closedPool},
		{"SilentServer", silent},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newOrderHandler()
			mw := idempotency.New(idempotency.Config{
				Store:        postgres.NewStore(c.pool(t)),
				StoreTimeout: storeTimeout,
			})
			srv := httptest.NewServer(mw(h))
			t.Cleanup(srv.Close)

			start := time.Now()
			resp, body := post(t, srv, "/orders", randomName("k-"), "{}")
			elapsed := time.Since(start)
			assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
			assert.NotEmpty(t, resp.Header.Get("Retry-After"))
			assert.True(t, strings.HasSuffix(problemType(t, body), idempotency.ProblemStoreUnavailable))
			assert.Less(t, elapsed, storeTimeout+time.Second, "bounded by StoreTimeout")
			assert.Zero(t, h.runs.Load(), "the handler did not run")
		})
	}
}

// TestStoreOutageRecovers puts a proxy between the pool and PostgreSQL and
// cuts it: requests get 503 while it is down and succeed, with nothing to
// restart, once it is back.
func TestStoreOutageRecovers(t *testing.T) {
	cfg := poolConfig(t)
	proxy := newToggleProxy(t, fmt.Sprintf("%s:%d", cfg.ConnConfig.Host, cfg.ConnConfig.Port))
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = proxy.host, proxy.port
	cfg.ConnConfig.ConnectTimeout = time.Second
	pool := newPool(t, cfg)
	store := newStore(t, pool)
	h := newOrderHandler()
	srv := httptest.NewServer(idempotency.New(idempotency.Config{Store: store, StoreTimeout: 500 * time.Millisecond})(h))
	t.Cleanup(srv.Close)

	resp, _ := post(t, srv, "/orders", randomName("up-"), "{}")
	require.Equal(t, http.StatusCreated, resp.StatusCode)

	proxy.setDown(true)
	resp, _ = post(t, srv, "/orders", randomName("down-"), "{}")
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)

	proxy.setDown(false)
	key := randomName("back-")
	var status int
	for range 20 { // the pool drops the broken connections as it meets them
		resp, _ = post(t, srv, "/orders", key, "{}")
		if status = resp.StatusCode; status == http.StatusCreated {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	assert.Equal(t, http.StatusCreated, status)
	resp, _ = post(t, srv, "/orders", key, "{}")
	assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader))
}

// outagePool returns a pool for a server at addr that will not work.
func outagePool(t *testing.T, addr string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), "postgres://u@"+addr+"/none?sslmode=disable")
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

// silentServer listens on a loopback port, accepts connections and never
// answers; it returns the address.
func silentServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
	})
	return ln.Addr().String()
}

// toggleProxy forwards loopback connections to a target until it is set
// down; then it cuts the connections it carries and refuses new ones.
type toggleProxy struct {
	host   string
	port   uint16
	target string

	mu    sync.Mutex
	down  bool
	conns []net.Conn
}

func newToggleProxy(t *testing.T, target string) *toggleProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().(*net.TCPAddr)
	p := &toggleProxy{host: "127.0.0.1", port: uint16(addr.Port), target: target}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { p.serve(c) })
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		p.setDown(true)
		wg.Wait()
	})
	return p
}

func (p *toggleProxy) serve(c net.Conn) {
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		_ = c.Close()
		return
	}
	p.mu.Unlock()
	up, err := net.DialTimeout("tcp", p.target, time.Second)
	if err != nil {
		_ = c.Close()
		return
	}
	p.mu.Lock()
	if p.down { // cut while dialling
		p.mu.Unlock()
		_ = c.Close()
		_ = up.Close()
		return
	}
	p.conns = append(p.conns, c, up)
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = io.Copy(up, c); _ = up.Close() })
	wg.Go(func() { _, _ = io.Copy(c, up); _ = c.Close() })
	wg.Wait()
}

// setDown cuts the proxy (closing what it carries) or restores it.
func (p *toggleProxy) setDown(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	if down {
		for _, c := range p.conns {
			_ = c.Close()
		}
		p.conns = nil
	}
}
