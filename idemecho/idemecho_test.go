package idemecho_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/idemecho"
)

const problemBase = "https://github.com/f8e778d0/idempotency#"

// result is what a client saw.
type result struct {
	status int
	header http.Header
	body   string
}

func (r result) replayed() bool { return r.header.Get(idempotency.ReplayedHeader) == "true" }

func (r result) problemType() string {
	var p struct {
		Type string `json:"type"`
	}
	if r.header.Get("Content-Type") == "application/problem+json" {
		_ = json.Unmarshal([]byte(r.body), &p)
	}
	return p.Type
}

// try sends a request; safe from any goroutine.
func try(ctx context.Context, method, url, key, body string, header ...string) (result, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		return result{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return result{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return result{status: resp.StatusCode, header: resp.Header, body: string(b)}, err
}

func post(t *testing.T, url, key, body string, header ...string) result {
	t.Helper()
	r, err := try(t.Context(), http.MethodPost, url, key, body, header...)
	require.NoError(t, err)
	return r
}

// assertSameResponse checks that a replay is the first response byte for
// byte: status, body and every header but Date and the replay marker.
func assertSameResponse(t *testing.T, first, replay result) {
	t.Helper()
	assert.False(t, first.replayed())
	assert.True(t, replay.replayed())
	assert.Equal(t, first.status, replay.status)
	assert.Equal(t, first.body, replay.body)
	strip := func(h http.Header) http.Header {
		h = h.Clone()
		h.Del("Date")
		h.Del(idempotency.ReplayedHeader)
		return h
	}
	assert.Equal(t, strip(first.header), strip(replay.header))
}

// seen is what a middleware in front of idemecho found after the chain.
type seen struct {
	status    int
	size      int64
	committed bool
	err       error
}

// app is an echo server with the middleware in the usual place: an
// observer, recovery and authentication in front, counting handlers
// behind.
type app struct {
	srv       *httptest.Server
	runs      atomic.Int64
	handled   atomic.Int64 // calls of the HTTPErrorHandler
	mu        sync.Mutex
	lastSeen  seen
	entered   chan struct{}
	gate      chan struct{}
	enterOnce sync.Once
	gateOnce  sync.Once
}

func (a *app) open() { a.gateOnce.Do(func() { close(a.gate) }) }

func (a *app) seen() seen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lastSeen
}

var errDatabase = errors.New("database is down")

func newApp(t *testing.T, cfg idempotency.Config, opts ...idemecho.Option) *app {
	t.Helper()
	a := &app{entered: make(chan struct{}), gate: make(chan struct{})}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.Logger.SetOutput(io.Discard)
	defaultHandler := e.HTTPErrorHandler
	e.HTTPErrorHandler = func(err error, c echo.Context) {
		a.handled.Add(1)
		defaultHandler(err, c)
	}
	e.Use(func(next echo.HandlerFunc) echo.HandlerFunc { // observes c.Response() after the chain
		return func(c echo.Context) error {
			err := next(c)
			a.mu.Lock()
			a.lastSeen = seen{c.Response().Status, c.Response().Size, c.Response().Committed, err}
			a.mu.Unlock()
			return err
		}
	})
	e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true, DisableErrorHandler: false}))
	e.Use(func(next echo.HandlerFunc) echo.HandlerFunc { // authentication
		return func(c echo.Context) error {
			c.Set("user", c.Request().Header.Get("X-User"))
			return next(c)
		}
	})
	e.Use(idemecho.New(cfg, opts...))

	e.POST("/orders", func(c echo.Context) error {
		var in struct{ Item string }
		if err := c.Bind(&in); err != nil {
			return err
		}
		n := a.runs.Add(1)
		key, _ := idempotency.KeyFromContext(c.Request().Context())
		c.Response().Header().Set("Location", fmt.Sprintf("/orders/%d", n))
		return c.JSON(http.StatusCreated, echo.Map{"id": n, "item": in.Item, "key": key, "user": c.Get("user")})
	})
	e.POST("/slow", func(c echo.Context) error {
		a.enterOnce.Do(func() { close(a.entered) })
		<-a.gate
		return c.String(http.StatusCreated, fmt.Sprintf("slow %d", a.runs.Add(1)))
	})
	e.POST("/missing", func(c echo.Context) error { // an error the handler returns: 404
		return echo.NewHTTPError(http.StatusNotFound, fmt.Sprintf("no item %d", a.runs.Add(1)))
	})
	e.POST("/broken", func(c echo.Context) error { // an error that becomes a 500
		a.runs.Add(1)
		return errDatabase
	})
	e.POST("/panic", func(c echo.Context) error {
		if a.runs.Add(1) == 1 {
			panic("boom")
		}
		return c.String(http.StatusCreated, "second try")
	})
	e.POST("/empty", func(c echo.Context) error { // writes nothing
		a.runs.Add(1)
		return c.NoContent(http.StatusAccepted)
	})
	a.srv = httptest.NewServer(e)
	t.Cleanup(a.srv.Close)
	t.Cleanup(a.open) // before the server closes
	return a
}

func TestEchoCoreScenarios(t *testing.T) {
	t.Run("first execution and its replay, byte for byte", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/orders", "k1", `{"item":"book"}`)
		require.Equal(t, http.StatusCreated, first.status, first.body)
		assert.JSONEq(t, `{"id":1,"item":"book","key":"k1","user":""}`, first.body)
		assert.Equal(t, "/orders/1", first.header.Get("Location"))
		assert.Equal(t, seen{http.StatusCreated, int64(len(first.body)), true, nil}, a.seen())

		replay := post(t, a.srv.URL+"/orders", "k1", `{"item":"book"}`)
		assertSameResponse(t, first, replay)
		assert.EqualValues(t, 1, a.runs.Load())
		assert.Equal(t, seen{http.StatusCreated, int64(len(replay.body)), true, nil}, a.seen(), "c.Response() is truthful after a replay")
	})

	t.Run("concurrent duplicates run once", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		firstIn := make(chan result, 1)
		go func() {
			r, err := try(t.Context(), http.MethodPost, a.srv.URL+"/slow", "dup", "{}")
			assert.NoError(t, err)
			firstIn <- r
		}()
		select {
		case <-a.entered:
		case <-time.After(5 * time.Second):
			t.Fatal("the first request never reached the handler")
		}
		const n = 8
		var wg sync.WaitGroup
		results := make(chan result, n)
		for range n {
			wg.Go(func() {
				r, err := try(t.Context(), http.MethodPost, a.srv.URL+"/slow", "dup", "{}")
				assert.NoError(t, err)
				results <- r
			})
		}
		wg.Wait()
		close(results)
		for r := range results {
			assert.Equal(t, http.StatusConflict, r.status)
			assert.Equal(t, problemBase+idempotency.ProblemInProgress, r.problemType())
		}
		a.open()
		first := <-firstIn
		assert.Equal(t, "slow 1", first.body)
		assert.EqualValues(t, 1, a.runs.Load(), "exactly one execution")
		assertSameResponse(t, first, post(t, a.srv.URL+"/slow", "dup", "{}"))
	})

	t.Run("a different request with the key is 422", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		require.Equal(t, http.StatusCreated, post(t, a.srv.URL+"/orders", "k2", `{"item":"book"}`).status)
		other := post(t, a.srv.URL+"/orders", "k2", `{"item":"lamp"}`)
		assert.Equal(t, http.StatusUnprocessableEntity, other.status)
		assert.Equal(t, problemBase+idempotency.ProblemKeyReused, other.problemType())
		assert.EqualValues(t, 1, a.runs.Load())
	})

	t.Run("a missing required key is 400", func(t *testing.T) {
		a := newApp(t, idempotency.Config{RequireKey: true})
		none := post(t, a.srv.URL+"/orders", "", `{"item":"book"}`)
		assert.Equal(t, http.StatusBadRequest, none.status)
		assert.Equal(t, problemBase+idempotency.ProblemKeyRequired, none.problemType())
		assert.Zero(t, a.runs.Load())
		assert.Equal(t, seen{http.StatusBadRequest, int64(len(none.body)), true, nil}, a.seen())
	})

	t.Run("a panic releases the claim and reaches the recovery", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/panic", "k3", "{}")
		assert.Equal(t, http.StatusInternalServerError, first.status)
		retry := post(t, a.srv.URL+"/panic", "k3", "{}")
		assert.Equal(t, http.StatusCreated, retry.status, "the retry runs: never a 409")
		assert.Equal(t, "second try", retry.body)
		assert.False(t, retry.replayed())
		assert.EqualValues(t, 2, a.runs.Load())
	})

	t.Run("no content", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/empty", "k4", "{}")
		assert.Equal(t, http.StatusAccepted, first.status)
		assertSameResponse(t, first, post(t, a.srv.URL+"/empty", "k4", "{}"))
		assert.EqualValues(t, 1, a.runs.Load())
	})
}

// Errors the handlers return are rendered inside the middleware: the
// client's response is the stored one.
func TestEchoHandlerErrors(t *testing.T) {
	t.Run("an HTTPError is stored and replayed byte for byte", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/missing", "e1", "{}")
		assert.Equal(t, http.StatusNotFound, first.status)
		assert.JSONEq(t, `{"message":"no item 1"}`, first.body)
		assert.Equal(t, seen{http.StatusNotFound, int64(len(first.body)), true, nil}, a.seen(),
			"rendered inside; no error goes further out")

		replay := post(t, a.srv.URL+"/missing", "e1", "{}")
		assertSameResponse(t, first, replay)
		assert.EqualValues(t, 1, a.runs.Load())
		assert.EqualValues(t, 1, a.handled.Load(), "the error handler ran once, for the first execution")
	})

	t.Run("an error that becomes a 500 is not stored", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		for range 2 {
			r := post(t, a.srv.URL+"/broken", "e2", "{}")
			assert.Equal(t, http.StatusInternalServerError, r.status)
			assert.JSONEq(t, `{"message":"Internal Server Error"}`, r.body, "no internal text")
			assert.False(t, r.replayed())
		}
		assert.EqualValues(t, 2, a.runs.Load(), "released: the retry runs")
	})

	t.Run("a bind error is stored", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/orders", "e3", `{"item":`)
		assert.Equal(t, http.StatusBadRequest, first.status)
		assertSameResponse(t, first, post(t, a.srv.URL+"/orders", "e3", `{"item":`))
	})

	t.Run("without a key the error is returned as usual", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		r := post(t, a.srv.URL+"/broken", "", "{}")
		assert.Equal(t, http.StatusInternalServerError, r.status)
		got := a.seen()
		assert.ErrorIs(t, got.err, errDatabase, "the middleware in front sees the error")
		assert.False(t, got.committed, "nothing was written before echo renders it")
	})
}

func TestEchoKeyScope(t *testing.T) {
	a := newApp(t, idempotency.Config{}, idemecho.WithKeyScope(func(c echo.Context) string {
		u, _ := c.Get("user").(string)
		return u
	}))
	alice := post(t, a.srv.URL+"/orders", "shared", `{"item":"book"}`, "X-User", "alice")
	bob := post(t, a.srv.URL+"/orders", "shared", `{"item":"book"}`, "X-User", "bob")
	assert.False(t, bob.replayed(), "another user's key never meets alice's")
	assert.JSONEq(t, `{"id":2,"item":"book","key":"shared","user":"bob"}`, bob.body)
	assertSameResponse(t, alice, post(t, a.srv.URL+"/orders", "shared", `{"item":"book"}`, "X-User", "alice"))
	assert.EqualValues(t, 2, a.runs.Load())

	assert.PanicsWithValue(t, "idemecho: Config.KeyScope and WithKeyScope are both set", func() {
		idemecho.New(idempotency.Config{KeyScope: func(*http.Request) string { return "" }},
			idemecho.WithKeyScope(func(echo.Context) string { return "" }))
	})
}

// A server-wide instance and a group's own with RequireKey.
func TestEchoNestedGroup(t *testing.T) {
	store := idempotency.NewMemoryStore()
	e := echo.New()
	e.Use(idemecho.New(idempotency.Config{Store: store}))
	var runs atomic.Int64
	pay := e.Group("/payments", idemecho.New(idempotency.Config{Store: store, RequireKey: true}))
	pay.POST("", func(c echo.Context) error {
		return c.String(http.StatusCreated, fmt.Sprintf("payment %d", runs.Add(1)))
	})
	pay.POST("/missing", func(c echo.Context) error {
		runs.Add(1)
		return echo.NewHTTPError(http.StatusNotFound, "no such payment")
	})
	e.POST("/orders", func(c echo.Context) error {
		return c.String(http.StatusCreated, fmt.Sprintf("order %d", runs.Add(1)))
	})
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)

	first := post(t, srv.URL+"/payments", "n1", "{}")
	assert.Equal(t, http.StatusCreated, first.status, first.body)
	assertSameResponse(t, first, post(t, srv.URL+"/payments", "n1", "{}"))
	assert.EqualValues(t, 1, runs.Load())

	missing := post(t, srv.URL+"/payments/missing", "n2", "{}")
	assert.Equal(t, http.StatusNotFound, missing.status)
	assertSameResponse(t, missing, post(t, srv.URL+"/payments/missing", "n2", "{}"))
	assert.EqualValues(t, 2, runs.Load())

	none := post(t, srv.URL+"/payments", "", "{}")
	assert.Equal(t, http.StatusBadRequest, none.status)
	assert.Equal(t, problemBase+idempotency.ProblemKeyRequired, none.problemType())
	assert.Equal(t, http.StatusCreated, post(t, srv.URL+"/orders", "", "{}").status)
	assert.EqualValues(t, 3, runs.Load())
}
