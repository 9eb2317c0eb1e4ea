package idemgin_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/idemgin"
)

func TestMain(m *testing.M) {
	gin.SetMode(gin.TestMode)
	os.Exit(m.Run())
}

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

// seen is what an observing middleware in front of idemgin found in
// c.Writer after the chain.
type seen struct {
	status  int
	size    int
	written bool
}

// app is a gin engine with the middleware in the usual place: recovery
// and authentication in front (and an observer of c.Writer in front of all), a counting handler behind.
type app struct {
	srv       *httptest.Server
	runs      atomic.Int64 // handler executions
	after     atomic.Int64 // executions of a middleware after idemgin
	mu        sync.Mutex
	lastSeen  seen
	recovered atomic.Int64
	entered   chan struct{} // closed when /slow is first entered
	gate      chan struct{} // /slow waits for it
	enterOnce sync.Once
	gateOnce  sync.Once
}

// open lets /slow go on.
func (a *app) open() { a.gateOnce.Do(func() { close(a.gate) }) }

func (a *app) seen() seen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lastSeen
}

func newApp(t *testing.T, cfg idempotency.Config, opts ...idemgin.Option) *app {
	t.Helper()
	a := &app{entered: make(chan struct{}), gate: make(chan struct{})}

	r := gin.New()
	r.Use(func(c *gin.Context) { // observes c.Writer after the chain
		c.Next()
		a.mu.Lock()
		a.lastSeen = seen{c.Writer.Status(), c.Writer.Size(), c.Writer.Written()}
		a.mu.Unlock()
	})
	r.Use(gin.CustomRecoveryWithWriter(io.Discard, func(c *gin.Context, _ any) {
		a.recovered.Add(1)
		c.AbortWithStatus(http.StatusInternalServerError)
	}))
	r.Use(func(c *gin.Context) { // authentication
		if u := c.GetHeader("X-User"); u != "" {
			c.Set("user", u)
		}
	})
	r.Use(idemgin.New(cfg, opts...))
	r.Use(func(c *gin.Context) { a.after.Add(1) })

	r.POST("/orders", func(c *gin.Context) {
		var in struct{ Item string }
		if err := c.ShouldBindJSON(&in); err != nil {
			c.JSON(http.StatusBadRequest, gin.H{"error": "malformed"})
			return
		}
		n := a.runs.Add(1)
		key, _ := idempotency.KeyFromContext(c.Request.Context())
		c.Header("Location", fmt.Sprintf("/orders/%d", n))
		c.JSON(http.StatusCreated, gin.H{"id": n, "item": in.Item, "key": key, "user": c.GetString("user")})
	})
	r.POST("/slow", func(c *gin.Context) {
		a.enterOnce.Do(func() { close(a.entered) })
		<-a.gate
		n := a.runs.Add(1)
		c.String(http.StatusCreated, "slow %d", n)
	})
	r.POST("/accepted", func(c *gin.Context) { // status only, sent after the chain
		a.runs.Add(1)
		c.Header("X-Job", "7")
		c.Status(http.StatusCreated)
		c.Status(http.StatusAccepted) // the last one wins
	})
	r.POST("/late-status", func(c *gin.Context) { // a status set after c.Next by a middleware
		c.Next()
	}, func(c *gin.Context) {
		a.runs.Add(1)
	})
	r.POST("/panic", func(c *gin.Context) {
		if a.runs.Add(1) == 1 {
			panic("boom")
		}
		c.String(http.StatusCreated, "second try")
	})
	r.POST("/unavailable", func(c *gin.Context) {
		a.runs.Add(1)
		c.AbortWithStatusJSON(http.StatusServiceUnavailable, gin.H{"error": "later"})
	})
	a.srv = httptest.NewServer(r)
	t.Cleanup(a.srv.Close)
	t.Cleanup(a.open) // before the server closes
	return a
}

func TestGinCoreScenarios(t *testing.T) {
	t.Run("first execution and its replay, byte for byte", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/orders", "k1", `{"item":"book"}`)
		require.Equal(t, http.StatusCreated, first.status, first.body)
		assert.JSONEq(t, `{"id":1,"item":"book","key":"k1","user":""}`, first.body)
		assert.Equal(t, "/orders/1", first.header.Get("Location"))
		assert.Equal(t, seen{http.StatusCreated, len(first.body), true}, a.seen())

		replay := post(t, a.srv.URL+"/orders", "k1", `{"item":"book"}`)
		assertSameResponse(t, first, replay)
		assert.EqualValues(t, 1, a.runs.Load())
		assert.EqualValues(t, 1, a.after.Load(), "the chain after the middleware was aborted")
		assert.Equal(t, seen{http.StatusCreated, len(replay.body), true}, a.seen(), "c.Writer is truthful after a replay")
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
			assert.NotEmpty(t, r.header.Get("Retry-After"))
		}
		a.open()
		first := <-firstIn
		assert.Equal(t, http.StatusCreated, first.status)
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
		assert.Equal(t, seen{http.StatusUnprocessableEntity, len(other.body), true}, a.seen())
	})

	t.Run("a missing required key is 400", func(t *testing.T) {
		a := newApp(t, idempotency.Config{RequireKey: true})
		none := post(t, a.srv.URL+"/orders", "", `{"item":"book"}`)
		assert.Equal(t, http.StatusBadRequest, none.status)
		assert.Equal(t, problemBase+idempotency.ProblemKeyRequired, none.problemType())
		assert.Zero(t, a.runs.Load())
		assert.Zero(t, a.after.Load())
	})

	t.Run("a missing optional key passes through", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		for range 2 {
			assert.Equal(t, http.StatusCreated, post(t, a.srv.URL+"/orders", "", `{"item":"book"}`).status)
		}
		assert.EqualValues(t, 2, a.runs.Load())
	})

	t.Run("a panic releases the claim and reaches gin's recovery", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/panic", "k3", "{}")
		assert.Equal(t, http.StatusInternalServerError, first.status)
		assert.EqualValues(t, 1, a.recovered.Load(), "the recovery in front saw the panic")
		assert.Equal(t, http.StatusInternalServerError, a.seen().status)

		retry := post(t, a.srv.URL+"/panic", "k3", "{}")
		assert.Equal(t, http.StatusCreated, retry.status, "the retry runs: never a 409")
		assert.Equal(t, "second try", retry.body)
		assert.False(t, retry.replayed())
		assert.EqualValues(t, 2, a.runs.Load())
	})

	t.Run("a 503 from the handler is not stored", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		for range 2 {
			r := post(t, a.srv.URL+"/unavailable", "k4", "{}")
			assert.Equal(t, http.StatusServiceUnavailable, r.status)
			assert.False(t, r.replayed())
		}
		assert.EqualValues(t, 2, a.runs.Load())
	})
}

// gin sends a status set with c.Status only after the chain: it is
// stored, and replayed, as gin sent it.
func TestGinPendingStatus(t *testing.T) {
	t.Run("c.Status only, the last one wins", func(t *testing.T) {
		a := newApp(t, idempotency.Config{})
		first := post(t, a.srv.URL+"/accepted", "s1", "{}")
		assert.Equal(t, http.StatusAccepted, first.status)
		assert.Equal(t, "7", first.header.Get("X-Job"))
		assert.Empty(t, first.body)
		assert.Equal(t, seen{http.StatusAccepted, 0, true}, a.seen())

		replay := post(t, a.srv.URL+"/accepted", "s1", "{}")
		assertSameResponse(t, first, replay)
		assert.EqualValues(t, 1, a.runs.Load())
		assert.Equal(t, seen{http.StatusAccepted, 0, true}, a.seen())
	})

	t.Run("a status set after c.Next by a middleware behind", func(t *testing.T) {
		r := gin.New()
		var runs atomic.Int64
		r.Use(idemgin.New(idempotency.Config{}))
		r.Use(func(c *gin.Context) {
			c.Next()
			if !c.Writer.Written() {
				c.Status(http.StatusNoContent)
			}
		})
		r.POST("/x", func(c *gin.Context) { runs.Add(1) })
		srv := httptest.NewServer(r)
		t.Cleanup(srv.Close)

		first := post(t, srv.URL+"/x", "s2", "{}")
		assert.Equal(t, http.StatusNoContent, first.status)
		replay := post(t, srv.URL+"/x", "s2", "{}")
		assertSameResponse(t, first, replay)
		assert.EqualValues(t, 1, runs.Load())
	})

	t.Run("a status set in front of the middleware", func(t *testing.T) {
		r := gin.New()
		var runs atomic.Int64
		r.Use(func(c *gin.Context) { c.Status(http.StatusAccepted) })
		r.Use(idemgin.New(idempotency.Config{}))
		r.POST("/x", func(c *gin.Context) { runs.Add(1) })
		srv := httptest.NewServer(r)
		t.Cleanup(srv.Close)

		first := post(t, srv.URL+"/x", "s3", "{}")
		assert.Equal(t, http.StatusAccepted, first.status)
		assertSameResponse(t, first, post(t, srv.URL+"/x", "s3", "{}"))
		assert.EqualValues(t, 1, runs.Load())
	})

	t.Run("c.Writer inside the chain", func(t *testing.T) {
		r := gin.New()
		r.Use(idemgin.New(idempotency.Config{}))
		var got []seen
		r.POST("/x", func(c *gin.Context) {
			got = append(got, seen{c.Writer.Status(), c.Writer.Size(), c.Writer.Written()})
			c.Status(http.StatusCreated)
			got = append(got, seen{c.Writer.Status(), c.Writer.Size(), c.Writer.Written()})
			_, _ = c.Writer.WriteString("hello")
			got = append(got, seen{c.Writer.Status(), c.Writer.Size(), c.Writer.Written()})
			c.Status(http.StatusTeapot) // too late: ignored, as gin does
			got = append(got, seen{c.Writer.Status(), c.Writer.Size(), c.Writer.Written()})
		})
		srv := httptest.NewServer(r)
		t.Cleanup(srv.Close)

		first := post(t, srv.URL+"/x", "s4", "{}")
		assert.Equal(t, http.StatusCreated, first.status)
		assert.Equal(t, []seen{
			{http.StatusOK, -1, false},
			{http.StatusCreated, -1, false},
			{http.StatusCreated, 5, true},
			{http.StatusCreated, 5, true},
		}, got)
		assertSameResponse(t, first, post(t, srv.URL+"/x", "s4", "{}"))
	})
}

func TestGinKeyScope(t *testing.T) {
	a := newApp(t, idempotency.Config{}, idemgin.WithKeyScope(func(c *gin.Context) string { return c.GetString("user") }))
	alice := post(t, a.srv.URL+"/orders", "shared", `{"item":"book"}`, "X-User", "alice")
	bob := post(t, a.srv.URL+"/orders", "shared", `{"item":"book"}`, "X-User", "bob")
	assert.False(t, bob.replayed(), "another user's key never meets alice's")
	assert.JSONEq(t, `{"id":2,"item":"book","key":"shared","user":"bob"}`, bob.body)
	again := post(t, a.srv.URL+"/orders", "shared", `{"item":"book"}`, "X-User", "alice")
	assertSameResponse(t, alice, again)
	assert.EqualValues(t, 2, a.runs.Load())

	assert.PanicsWithValue(t, "idemgin: Config.KeyScope and WithKeyScope are both set", func() {
		idemgin.New(idempotency.Config{KeyScope: func(*http.Request) string { return "" }},
			idemgin.WithKeyScope(func(*gin.Context) string { return "" }))
	})
}

// A router-wide instance and a group's own with RequireKey: the group's
// lets the router-wide one's claim through.
func TestGinNestedGroup(t *testing.T) {
	store := idempotency.NewMemoryStore()
	r := gin.New()
	r.Use(idemgin.New(idempotency.Config{Store: store}))
	var runs atomic.Int64
	pay := r.Group("/payments", idemgin.New(idempotency.Config{Store: store, RequireKey: true}))
	pay.POST("", func(c *gin.Context) {
		c.String(http.StatusCreated, "payment %d", runs.Add(1))
	})
	r.POST("/orders", func(c *gin.Context) { c.String(http.StatusCreated, "order %d", runs.Add(1)) })
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)

	first := post(t, srv.URL+"/payments", "n1", "{}")
	assert.Equal(t, http.StatusCreated, first.status, first.body)
	assertSameResponse(t, first, post(t, srv.URL+"/payments", "n1", "{}"))
	assert.EqualValues(t, 1, runs.Load())

	none := post(t, srv.URL+"/payments", "", "{}")
	assert.Equal(t, http.StatusBadRequest, none.status)
	assert.Equal(t, problemBase+idempotency.ProblemKeyRequired, none.problemType())
	assert.Equal(t, http.StatusCreated, post(t, srv.URL+"/orders", "", "{}").status)
	assert.EqualValues(t, 2, runs.Load())
}

// Methods the middleware does not cover pass through with gin's own
// writer semantics.
func TestGinUncoveredMethod(t *testing.T) {
	r := gin.New()
	r.Use(idemgin.New(idempotency.Config{}))
	var runs atomic.Int64
	r.GET("/x", func(c *gin.Context) { c.String(http.StatusOK, "get %d", runs.Add(1)) })
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	for i := 1; i <= 2; i++ {
		got, err := try(t.Context(), http.MethodGet, srv.URL+"/x", "g", "")
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprintf("get %d", i), got.body)
		assert.False(t, got.replayed())
	}
}

// Flush streams through the middleware's recorder, and
// http.ResponseController reaches the connection through Unwrap.
func TestGinFlushAndResponseController(t *testing.T) {
	r := gin.New()
	r.Use(idemgin.New(idempotency.Config{}))
	var runs atomic.Int64
	r.POST("/stream", func(c *gin.Context) {
		runs.Add(1)
		rc := http.NewResponseController(c.Writer)
		assert.NoError(t, rc.SetWriteDeadline(time.Now().Add(time.Minute)))
		c.Status(http.StatusCreated)
		_, _ = c.Writer.WriteString("part 1;")
		c.Writer.Flush()
		_, _ = c.Writer.WriteString("part 2")
	})
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)

	first := post(t, srv.URL+"/stream", "f1", "{}")
	assert.Equal(t, http.StatusCreated, first.status)
	assert.Equal(t, "part 1;part 2", first.body)
	replay := post(t, srv.URL+"/stream", "f1", "{}")
	assert.True(t, replay.replayed())
	assert.Equal(t, first.body, replay.body)
	assert.Equal(t, http.StatusCreated, replay.status)
	assert.EqualValues(t, 1, runs.Load())
}
