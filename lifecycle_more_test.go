package idempotency_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

func TestCustomFingerprint(t *testing.T) {
	s := lcStart(t, idempotency.Config{Fingerprint: func(r *http.Request) []byte {
		sum := sha256.Sum256([]byte(r.Header.Get("X-Account")))
		return sum[:]
	}}, lcCreated)
	send := func(account, body string) lcResult {
		req, _ := http.NewRequest(http.MethodPost, s.URL, strings.NewReader(body))
		req.Header.Set("Idempotency-Key", "k")
		req.Header.Set("X-Account", account)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return lcResult{resp.StatusCode, resp.Header, string(b)}
	}
	assert.Equal(t, http.StatusCreated, send("acct-1", "a").status)
	r := send("acct-1", "other body") // the custom fingerprint ignores the body
	assert.True(t, r.replayed())
	assert.Equal(t, http.StatusUnprocessableEntity, send("acct-2", "a").status)
	assert.EqualValues(t, 1, s.runs.Load())
}

func TestCustomNoReplayHeadersAndWriteProblem(t *testing.T) {
	var problems atomic.Int64
	s := lcStart(t, idempotency.Config{
		NoReplayHeaders: []string{"x-secret"},
		WriteProblem: func(w http.ResponseWriter, r *http.Request, p *idempotency.Problem) {
			problems.Add(1)
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(p.Status)
			fmt.Fprintf(w, "custom %d %s", p.Status, p.Type)
		},
	}, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		w.Header().Set("X-Secret", "s")
		w.Header().Set("Set-Cookie", "a=b") // no longer in the list: replayed
		w.WriteHeader(http.StatusCreated)
	})
	lcDo(t, s.URL, http.MethodPost, "k", "{}")
	r := lcDo(t, s.URL, http.MethodPost, "k", "{}")
	assert.True(t, r.replayed())
	assert.Empty(t, r.header.Get("X-Secret"))
	assert.Equal(t, "a=b", r.header.Get("Set-Cookie"))

	r = lcDo(t, s.URL, http.MethodPost, "k", `{"other":1}`)
	assert.Equal(t, http.StatusUnprocessableEntity, r.status)
	assert.Equal(t, "custom 422 "+"https://github.com/f8e778d0/idempotency#"+idempotency.ProblemKeyReused, r.body)
	assert.EqualValues(t, 1, problems.Load())
}

func TestTrailersAreNotStored(t *testing.T) {
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "payload")
		w.Header().Set("X-Checksum", "abc")
	})
	req, _ := http.NewRequest(http.MethodPost, s.URL, strings.NewReader("{}"))
	req.Header.Set("Idempotency-Key", "k")
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	assert.Equal(t, "abc", resp.Trailer.Get("X-Checksum"), "the first client gets its trailer")

	r := lcDo(t, s.URL, http.MethodPost, "k", "{}")
	assert.True(t, r.replayed())
	assert.Equal(t, "payload", r.body)
	assert.Empty(t, r.header.Values("Trailer"))
	assert.Empty(t, r.header.Values("X-Checksum"))
}

// moreEarlyResponder answers and flushes before it reads the body, then
// reads the rest. On HTTP/1.x net/http discards an unread body once the
// response has started, so the handler reads nothing there; on HTTP/2 it
// reads the whole body.
func moreEarlyResponder(w http.ResponseWriter, r *http.Request) {
	w.WriteHeader(http.StatusCreated)
	w.(http.Flusher).Flush()
	b, _ := io.ReadAll(r.Body)
	fmt.Fprintf(w, "read %d bytes", len(b))
}

// TestEarlyResponderThroughTheMiddleware: the middleware reads no body on
// its own, so the handler gets exactly what it gets without it, and the
// fingerprint covers what the handler read: a retry whose body differs
// only where the handler read nothing is the same request.
func TestEarlyResponderThroughTheMiddleware(t *testing.T) {
	body := strings.Repeat("0123456789", 10_000) // 100 kB
	for _, tt := range []struct {
		proto string
		read  string
	}{
		{"HTTP/1.1", "read 0 bytes"},
		{"HTTP/2.0", "read 100000 bytes"},
	} {
		t.Run(tt.proto, func(t *testing.T) {
			var runs atomic.Int64
			srv := httptest.NewUnstartedServer(idempotency.New(idempotency.Config{})(http.HandlerFunc(
				func(w http.ResponseWriter, r *http.Request) {
					runs.Add(1)
					moreEarlyResponder(w, r)
				})))
			if tt.proto == "HTTP/2.0" {
				srv.EnableHTTP2 = true
				srv.StartTLS()
			} else {
				srv.Start()
			}
			defer srv.Close()
			client := srv.Client()
			send := func(b string) (int, string, bool) {
				req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(b))
				req.Header.Set("Idempotency-Key", "early")
				resp, err := client.Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				assert.Equal(t, tt.proto, resp.Proto)
				got, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, string(got), resp.Header.Get(idempotency.ReplayedHeader) == "true"
			}
			status, got, replayed := send(body)
			assert.Equal(t, http.StatusCreated, status)
			assert.Equal(t, tt.read, got, "the handler gets what it gets without the middleware")
			assert.False(t, replayed)

			status, got, replayed = send(body)
			assert.Equal(t, http.StatusCreated, status)
			assert.True(t, replayed, "a faithful retry must match the fingerprint")
			assert.Equal(t, tt.read, got)

			status, _, replayed = send(body[:len(body)-1] + "X")
			if tt.read == "read 0 bytes" {
				assert.True(t, replayed, "the handler read none of the body that differs")
			} else {
				assert.Equal(t, http.StatusUnprocessableEntity, status)
			}
			assert.EqualValues(t, 1, runs.Load())
		})
	}
}

func TestBodiesDifferingAfterTheLimitAreTheSameRequest(t *testing.T) {
	s := lcStart(t, idempotency.Config{FingerprintBodyLimit: 16}, lcCreated)
	lcDo(t, s.URL, http.MethodPost, "k", strings.Repeat("a", 16)+"tail-1")
	r := lcDo(t, s.URL, http.MethodPost, "k", strings.Repeat("a", 16)+"tail-2")
	assert.True(t, r.replayed())
	r = lcDo(t, s.URL, http.MethodPost, "k", strings.Repeat("b", 16)+"tail-1")
	assert.Equal(t, http.StatusUnprocessableEntity, r.status)
	assert.EqualValues(t, 1, s.runs.Load())
}

func TestRedisStoreOnRing(t *testing.T) {
	m1, m2 := miniredis.RunT(t), miniredis.RunT(t)
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": m1.Addr(), "b": m2.Addr()}})
	t.Cleanup(func() { ring.Close() })
	s := lcStart(t, idempotency.Config{Store: idempotency.NewRedisStore(ring)}, lcCreated)
	for i := 0; i < 20; i++ {
		key := fmt.Sprintf("ring-%d", i)
		assert.False(t, lcDo(t, s.URL, http.MethodPost, key, "{}").replayed())
		assert.True(t, lcDo(t, s.URL, http.MethodPost, key, "{}").replayed())
	}
	assert.EqualValues(t, 20, s.runs.Load())
	assert.NotZero(t, len(m1.Keys()))
	assert.NotZero(t, len(m2.Keys()))
}

// The tests below pin down lease and failure windows found in review.

func TestUnreadBodyIsNotFingerprinted(t *testing.T) {
	s := lcStart(t, idempotency.Config{}, func(w http.ResponseWriter, r *http.Request) {
		r.Body.Close()
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "ok")
	})
	require.Equal(t, http.StatusCreated, lcDo(t, s.URL, http.MethodPost, "k", `{"amount":100}`).status)
	assert.True(t, lcDo(t, s.URL, http.MethodPost, "k", `{"amount":100}`).replayed())
	assert.True(t, lcDo(t, s.URL, http.MethodPost, "k", `{"amount":999}`).replayed(), "the handler read none of it")
	assert.Equal(t, http.StatusUnprocessableEntity, lcDo(t, s.URL, http.MethodPut, "k", `{"amount":100}`).status)
}

// moreHangingExtendStore never answers a renewal.
type moreHangingExtendStore struct{ idempotency.Store }

func (moreHangingExtendStore) Extend(ctx context.Context, _, _ string, _ time.Duration) error {
	<-ctx.Done()
	return ctx.Err()
}

func TestLeaseLossCancelsBeforeTakeover(t *testing.T) {
	var firstCancelled, overlap atomic.Bool
	var runs atomic.Int64
	release := make(chan struct{})
	started := make(chan struct{})
	cfg := idempotency.Config{Store: moreHangingExtendStore{idempotency.NewMemoryStore()},
		LockTTL: 300 * time.Millisecond, StoreTimeout: 2 * time.Second}
	s := lcStart(t, cfg, func(w http.ResponseWriter, r *http.Request) {
		if runs.Add(1) == 1 {
			close(started)
			select {
			case <-r.Context().Done():
				firstCancelled.Store(true)
			case <-release:
			}
			w.WriteHeader(http.StatusCreated)
			return
		}
		overlap.Store(!firstCancelled.Load())
		close(release)
		w.WriteHeader(http.StatusCreated)
	})
	done := make(chan struct{})
	go func() { defer close(done); lcDo(t, s.URL, http.MethodPost, "k", "x") }()
	<-started
	var second lcResult
	require.Eventually(t, func() bool {
		second = lcDo(t, s.URL, http.MethodPost, "k", "x")
		return second.status != http.StatusConflict
	}, 5*time.Second, 20*time.Millisecond)
	<-done
	// Either the first request still completed before its claim ran out in
	// the store (the second got its replay), or the second took the key
	// over; in both cases the first handler's context was cancelled first.
	assert.True(t, firstCancelled.Load(), "a lease that cannot be renewed must cancel the handler")
	assert.False(t, overlap.Load(), "a second execution started while the first handler's context was live")
	if runs.Load() == 1 {
		assert.True(t, second.replayed(), "status %d: %s", second.status, second.body)
	}
}

func TestFingerprintPanicReleasesClaim(t *testing.T) {
	var calls atomic.Int64
	inner := idempotency.New(idempotency.Config{Fingerprint: func(r *http.Request) []byte {
		if calls.Add(1) == 1 {
			panic("bug in the fingerprint")
		}
		return []byte("fp")
	}})(http.HandlerFunc(lcCreated))
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if recover() != nil {
				w.WriteHeader(http.StatusInternalServerError)
			}
		}()
		inner.ServeHTTP(w, r)
	})
	send := func() int {
		req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("x"))
		req.Header.Set("Idempotency-Key", "k")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		return w.Code
	}
	assert.Equal(t, http.StatusInternalServerError, send())
	assert.Equal(t, http.StatusCreated, send(), "the claim must be released after a panic")
}

func TestSlowBodyAfterHandlerKeepsLease(t *testing.T) {
	s := lcStart(t, idempotency.Config{LockTTL: 300 * time.Millisecond},
		func(w http.ResponseWriter, r *http.Request) {}) // ignores the body
	pr, pw := io.Pipe()
	go func() {
		pw.Write([]byte("a"))
		time.Sleep(700 * time.Millisecond)
		pw.Write([]byte("b"))
		pw.Close()
	}()
	req, _ := http.NewRequest(http.MethodPost, s.URL, pr)
	req.Header.Set("Idempotency-Key", "k")
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	r := lcDo(t, s.URL, http.MethodPost, "k", "ab")
	assert.EqualValues(t, 1, s.runs.Load(), "the handler ran twice")
	assert.True(t, r.replayed())
	assert.Zero(t, s.events.count(idempotency.OutcomeLeaseLost))
}

func TestCompletionGivenUpIsReported(t *testing.T) {
	store := lcNewFaultStore()
	store.setFail("complete", -1, errLcDown)
	s := lcStart(t, idempotency.Config{Store: store, LockTTL: 150 * time.Millisecond}, lcCreated)
	assert.Equal(t, http.StatusCreated, lcDo(t, s.URL, http.MethodPost, "k", "{}").status)
	require.Eventually(t, func() bool { return s.events.count(idempotency.OutcomeNotStored) == 1 }, 5*time.Second, time.Millisecond,
		"a response lost to the store must be reported")
}

// moreFailingBody fails after a few bytes, as a client that dies mid-upload.
type moreFailingBody struct{ sent bool }

func (b *moreFailingBody) Read(p []byte) (int, error) {
	if !b.sent {
		b.sent = true
		return copy(p, `{"amount":`), nil
	}
	return 0, errors.New("connection reset")
}

func (b *moreFailingBody) Close() error { return nil }

func TestFailedBodyRead(t *testing.T) {
	for _, tt := range []struct {
		name   string
		status int
	}{
		{"failure is released", http.StatusBadRequest},
		{"success is stored", http.StatusAccepted},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var runs atomic.Int64
			h := idempotency.New(idempotency.Config{})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				runs.Add(1)
				if _, err := io.ReadAll(r.Body); err != nil {
					w.WriteHeader(tt.status)
					return
				}
				w.WriteHeader(http.StatusCreated)
			}))
			send := func(body io.ReadCloser) int {
				req := httptest.NewRequest(http.MethodPost, "/", nil)
				req.Body, req.ContentLength = body, -1
				req.Header.Set("Idempotency-Key", "k")
				w := httptest.NewRecorder()
				h.ServeHTTP(w, req)
				return w.Code
			}
			assert.Equal(t, tt.status, send(&moreFailingBody{}))
			if tt.status >= 400 {
				// The request did not arrive whole: the identical retry runs.
				assert.Equal(t, http.StatusCreated, send(io.NopCloser(strings.NewReader(`{"amount":999}`))))
				assert.EqualValues(t, 2, runs.Load())
				return
			}
			// A success is kept under the fingerprint of what was read.
			assert.Equal(t, tt.status, send(io.NopCloser(strings.NewReader(`{"amount":999}`))))
			assert.Equal(t, http.StatusUnprocessableEntity, send(io.NopCloser(strings.NewReader(`{"other":1}`))))
			assert.EqualValues(t, 1, runs.Load())
		})
	}
}

func TestLeaseLostResponseIsNotStored(t *testing.T) {
	store := lcNewFaultStore()
	store.setFail("extend", -1, errLcDown) // renewals never get through
	var n atomic.Int64
	s := lcStart(t, idempotency.Config{Store: store, LockTTL: 300 * time.Millisecond}, func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			select {
			case <-r.Context().Done(): // a careful handler stops, as documented
				return
			case <-time.After(5 * time.Second):
			}
		}
		w.WriteHeader(http.StatusCreated)
	})
	first := lcDo(t, s.URL, http.MethodPost, "k", "{}")
	assert.Equal(t, http.StatusOK, first.status, "what the stopped handler left behind")
	assert.GreaterOrEqual(t, s.events.count(idempotency.OutcomeLeaseLost), 1)

	// The store works again: the stopped handler's empty answer was not
	// stored, and the retry runs.
	store.setFail("extend", 0, nil)
	r := lcDo(t, s.URL, http.MethodPost, "k", "{}")
	assert.False(t, r.replayed(), "a response written after ErrLeaseLost must not be replayed")
	assert.EqualValues(t, 2, s.runs.Load())
}

func TestFailOpenIgnoresClientHangUp(t *testing.T) {
	s := lcStart(t, idempotency.Config{
		Store:        lcHangingStore{idempotency.NewMemoryStore()},
		StoreTimeout: 10 * time.Second,
		FailOpen:     true,
	}, lcCreated)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.URL, nil)
	req.Header.Set("Idempotency-Key", "k")
	_, err := http.DefaultClient.Do(req)
	require.Error(t, err)
	time.Sleep(300 * time.Millisecond)
	assert.Zero(t, s.runs.Load(), "a client that hung up during the claim is no store outage: nothing runs unprotected")
}

// moreRecordingStore embeds a MemoryStore and overrides Claim and Complete:
// the middleware must go through the overrides, not the embedded store's
// own fast path.
type moreRecordingStore struct {
	*idempotency.MemoryStore
	claims    atomic.Int64
	completed atomic.Pointer[idempotency.Record]
}

func (s *moreRecordingStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	s.claims.Add(1)
	return s.MemoryStore.Claim(ctx, key, token, lease)
}

func (s *moreRecordingStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	c := *rec // the memory store keeps the header in a form of its own
	c.Response.Header = rec.Response.Header.Clone()
	s.completed.Store(&c)
	return s.MemoryStore.Complete(ctx, key, token, rec, ttl)
}

func TestWrappedStoreMethodsAreCalled(t *testing.T) {
	store := &moreRecordingStore{MemoryStore: idempotency.NewMemoryStore()}
	s := lcStart(t, idempotency.Config{Store: store}, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header()["X-Multi"] = []string{"a, b", "c"}
		w.Header().Set("Set-Cookie", "session=secret")
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, `{"id":1}`)
	})
	first := lcDo(t, s.URL, http.MethodPost, "k", "{}")
	require.Equal(t, http.StatusCreated, first.status)
	again := lcDo(t, s.URL, http.MethodPost, "k", "{}")
	assert.True(t, again.replayed())
	assert.Equal(t, []string{"a, b", "c"}, again.header.Values("X-Multi"))
	assert.EqualValues(t, 2, store.claims.Load(), "both claims went through the wrapper")

	rec := store.completed.Load()
	require.NotNil(t, rec, "the completion went through the wrapper")
	assert.Equal(t, idempotency.StateCompleted, rec.State)
	assert.NotEmpty(t, rec.Token)
	assert.Equal(t, http.StatusCreated, rec.Response.StatusCode)
	assert.Equal(t, `{"id":1}`, string(rec.Response.Body))
	assert.Equal(t, http.Header{
		"Content-Type": {"application/json"},
		"X-Multi":      {"a, b", "c"},
	}, rec.Response.Header, "never-replayed headers dropped; replay sets Content-Length")
	assert.NotEmpty(t, rec.Fingerprint)
}

// moreFixedStore answers every claim with one completed record.
type moreFixedStore struct {
	idempotency.Store
	rec idempotency.Record
}

func (s moreFixedStore) Claim(context.Context, string, string, time.Duration) (*idempotency.Record, error) {
	rec := s.rec
	return &rec, nil
}

func TestImpossibleRecordFromCustomStoreFailsClosed(t *testing.T) {
	for _, status := range []int{0, 42, 1000} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			store := moreFixedStore{Store: idempotency.NewMemoryStore(), rec: idempotency.Record{
				State:    idempotency.StateCompleted,
				Response: idempotency.Response{StatusCode: status},
			}}
			s := lcStart(t, idempotency.Config{Store: store, FailOpen: true}, lcCreated)
			r := lcDo(t, s.URL, http.MethodPost, "k", "{}")
			assert.Equal(t, http.StatusServiceUnavailable, r.status, "a record that cannot be replayed fails closed, FailOpen or not")
			assert.Zero(t, s.runs.Load())
			assert.Equal(t, 1, s.events.count(idempotency.OutcomeStoreError))
		})
	}
}

// extendCountingStore counts the renewals of the memory store it wraps.
type extendCountingStore struct {
	*idempotency.MemoryStore
	extends atomic.Int64
}

func (s *extendCountingStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	s.extends.Add(1)
	return s.MemoryStore.Extend(ctx, key, token, lease)
}

func TestFlightsReusedWhileRenewalsFire(t *testing.T) {
	// Pooled flights are set up for a new request without their lock,
	// relying on the renewal timer being stopped and on Timer.Reset
	// publishing the setup to the renewal it arms. With a lease of 3ms,
	// renewals fire every millisecond around handlers of up to 2.1ms,
	// from 8 goroutines: the race detector checks the publication, and
	// every request must execute once and be stored, unless a renewal came
	// too late (a lease this short can run out on a busy machine) and the
	// loss was reported.
	store := &extendCountingStore{MemoryStore: idempotency.NewMemoryStore()}
	var executed, lost atomic.Int64
	observe := func(e idempotency.Event) {
		if e.Outcome == idempotency.OutcomeLeaseLost {
			lost.Add(1)
		}
	}
	h := idempotency.New(idempotency.Config{Store: store, LockTTL: 3 * time.Millisecond, Observer: observe})(
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			executed.Add(1)
			if d := executed.Load() % 4; d > 0 {
				time.Sleep(time.Duration(d) * 700 * time.Microsecond)
			}
			w.WriteHeader(http.StatusCreated)
		}))
	const goroutines, each = 8, 150
	statuses := make(chan int, goroutines*each)
	done := make(chan struct{})
	for g := range goroutines {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := range each {
				req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("{}"))
				req.Header.Set("Idempotency-Key", fmt.Sprintf("reuse-%d-%d", g, i))
				w := httptest.NewRecorder()
				h.ServeHTTP(w, req)
				statuses <- w.Code
			}
		}()
	}
	for range goroutines {
		<-done
	}
	close(statuses)
	for code := range statuses {
		require.Equal(t, http.StatusCreated, code)
	}
	assert.EqualValues(t, goroutines*each, executed.Load(), "each request executed once")
	completed := 0
	for g := range goroutines {
		for i := range each {
			key := idempotency.StorageKey("", fmt.Sprintf("reuse-%d-%d", g, i))
			rec, err := store.Get(context.Background(), key)
			require.NoError(t, err)
			if rec != nil && rec.State == idempotency.StateCompleted {
				completed++
			}
		}
	}
	assert.EqualValues(t, goroutines*each, int64(completed)+lost.Load(), "each response stored, or its lease reported lost")
	assert.Positive(t, store.extends.Load(), "renewals fired while flights were reused")
}
