package idempotency_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// secStores returns the stores the security tests run against: the memory
// store and the Redis store on miniredis (whose keys the tests can list).
func secStores() map[string]func(t *testing.T) (idempotency.Store, *miniredis.Miniredis) {
	return map[string]func(t *testing.T) (idempotency.Store, *miniredis.Miniredis){
		"memory": func(t *testing.T) (idempotency.Store, *miniredis.Miniredis) {
			return idempotency.NewMemoryStore(), nil
		},
		"redis": func(t *testing.T) (idempotency.Store, *miniredis.Miniredis) {
			m := miniredis.RunT(t)
			client := redis.NewClient(&redis.Options{Addr: m.Addr()})
			t.Cleanup(func() { _ = client.Close() })
			return idempotency.NewRedisStore(client, idempotency.WithKeyPrefix("sec:")), m
		},
	}
}

// secDo sends a POST as user with key and returns what the client got.
func secDo(t *testing.T, url, user, key, body string) faultResult {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url+"/payments", strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-User", user)
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return faultResult{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

// TestSecurityScopesNeverMeet: two users who pick the same key (they will:
// clients count from 1, or use the same library with the same seed) each
// get their own execution and their own replay, never the other's
// response.
func TestSecurityScopesNeverMeet(t *testing.T) {
	faultNoLeak(t)
	t.Cleanup(http.DefaultClient.CloseIdleConnections)
	for name, newStore := range secStores() {
		t.Run(name, func(t *testing.T) {
			store, _ := newStore(t)
			var runs atomic.Int64
			srv := httptest.NewServer(idempotency.New(idempotency.Config{
				Store:    store,
				KeyScope: func(r *http.Request) string { return r.Header.Get("X-User") },
			})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				runs.Add(1)
				w.WriteHeader(http.StatusCreated)
				fmt.Fprintf(w, `{"payer":%q}`, r.Header.Get("X-User"))
			})))
			t.Cleanup(srv.Close)

			const key, body = "1", `{"amount":100}`
			alice := secDo(t, srv.URL, "alice", key, body)
			bob := secDo(t, srv.URL, "bob", key, body)
			assert.Equal(t, http.StatusCreated, bob.status)
			assert.Empty(t, bob.header.Get(idempotency.ReplayedHeader), "bob got alice's replay")
			assert.JSONEq(t, `{"payer":"bob"}`, bob.body)
			assert.EqualValues(t, 2, runs.Load())

			// A third user's different request with the same key is not a
			// mismatch with alice's either: it is another key.
			carol := secDo(t, srv.URL, "carol", key, `{"amount":1}`)
			assert.Equal(t, http.StatusCreated, carol.status)

			for _, c := range []struct{ user, body, want string }{
				{"alice", alice.body, `{"payer":"alice"}`},
				{"bob", bob.body, `{"payer":"bob"}`},
			} {
				r := secDo(t, srv.URL, c.user, key, body)
				assert.Equal(t, "true", r.header.Get(idempotency.ReplayedHeader))
				assert.JSONEq(t, c.want, r.body, "%s got someone else's response", c.user)
			}
			assert.EqualValues(t, 3, runs.Load())

			// A scope and key that concatenate alike are still apart.
			ab := secDo(t, srv.URL, "ab", "c", body)
			a := secDo(t, srv.URL, "a", "bc", body)
			assert.Empty(t, a.header.Get(idempotency.ReplayedHeader))
			assert.NotEqual(t, ab.body, a.body)
		})
	}
}

// secPrivateHeaders are the response headers that belong to the first
// caller and are never replayed by default.
var secPrivateHeaders = map[string]string{
	"Set-Cookie":          "session=alice-secret; Path=/; HttpOnly; Secure",
	"Www-Authenticate":    `Bearer realm="api", error="insufficient_scope"`,
	"Proxy-Authenticate":  `Basic realm="proxy"`,
	"Authentication-Info": `nextnonce="abc"`,
}

// secPrivateHandler answers 201 with the private headers set, and a
// header that is replayed, for contrast.
func secPrivateHandler(w http.ResponseWriter, r *http.Request) {
	for name, value := range secPrivateHeaders {
		w.Header().Set(name, value)
	}
	w.Header().Set("Location", "/payments/1")
	w.WriteHeader(http.StatusCreated)
	_, _ = io.WriteString(w, `{"id":1}`)
}

func TestSecurityPrivateHeadersNeverReplay(t *testing.T) {
	faultNoLeak(t)
	t.Cleanup(http.DefaultClient.CloseIdleConnections)
	for name, newStore := range secStores() {
		t.Run(name, func(t *testing.T) {
			store, m := newStore(t)
			srv := httptest.NewServer(idempotency.New(idempotency.Config{Store: store})(http.HandlerFunc(secPrivateHandler)))
			t.Cleanup(srv.Close)

			first := secDo(t, srv.URL, "alice", "pay-1", `{}`)
			for name, value := range secPrivateHeaders {
				assert.Equal(t, value, first.header.Get(name), "the first caller gets %s", name)
			}
			replay := secDo(t, srv.URL, "mallory", "pay-1", `{}`)
			require.Equal(t, "true", replay.header.Get(idempotency.ReplayedHeader))
			for name := range secPrivateHeaders {
				assert.Empty(t, replay.header.Values(name), "%s was replayed", name)
			}
			assert.Equal(t, "/payments/1", replay.header.Get("Location"))
			assert.Equal(t, first.body, replay.body)

			// They are not even stored.
			rec, err := store.Get(t.Context(), idempotency.StorageKey("", "pay-1"))
			require.NoError(t, err)
			require.NotNil(t, rec)
			for name := range secPrivateHeaders {
				assert.Empty(t, rec.Response.Header.Values(name), "%s was stored", name)
			}
			if m != nil {
				for _, k := range m.Keys() {
					v, err := m.Get(k)
					require.NoError(t, err)
					assert.NotContains(t, v, "alice-secret", "the cookie is in Redis")
				}
			}
		})
	}

	// Replaying them is an explicit choice: a non-nil empty list stores
	// every end-to-end header.
	srv := httptest.NewServer(idempotency.New(idempotency.Config{NoReplayHeaders: []string{}})(http.HandlerFunc(secPrivateHandler)))
	t.Cleanup(srv.Close)
	secDo(t, srv.URL, "alice", "pay-2", `{}`)
	replay := secDo(t, srv.URL, "alice", "pay-2", `{}`)
	assert.Equal(t, secPrivateHeaders["Set-Cookie"], replay.header.Get("Set-Cookie"))
}

// secKey is a client key distinctive enough that finding it anywhere
// means it leaked.
const secKey = "ck-4b1d9c0e-SECRET-7f3a"

// TestSecurityKeyNeverInClear: the client key reaches the store only as a
// hash, so it appears in no Redis key name and no stored value; the
// observer's events carry the hashed storage key and never the client key
// (except, of course, inside Event.Request, whose header holds it: an
// observer that logs request headers logs the key); problem responses
// never echo it.
func TestSecurityKeyNeverInClear(t *testing.T) {
	faultNoLeak(t)
	t.Cleanup(http.DefaultClient.CloseIdleConnections)
	m := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: m.Addr()})
	t.Cleanup(func() { _ = client.Close() })
	events := &faultEvents{}
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	var slow atomic.Bool
	srv := httptest.NewServer(idempotency.New(idempotency.Config{
		Store:        idempotency.NewRedisStore(client, idempotency.WithKeyPrefix("sec:")),
		KeyScope:     func(r *http.Request) string { return r.Header.Get("X-User") },
		Observer:     events.observe,
		StoreTimeout: 200 * time.Millisecond,
	})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if slow.Load() {
			started <- struct{}{}
			<-release
		}
		_, _ = io.ReadAll(r.Body)
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, `{"ok":true}`)
	})))
	t.Cleanup(srv.Close)
	unblock := sync.OnceFunc(func() { close(release) })
	t.Cleanup(unblock) // runs before srv.Close: a failing test does not hang

	problems := []faultResult{}
	assert.Equal(t, http.StatusCreated, secDo(t, srv.URL, "alice", secKey, `{"a":1}`).status) // executed
	assert.Equal(t, "true", secDo(t, srv.URL, "alice", secKey, `{"a":1}`).header.Get(idempotency.ReplayedHeader))
	mismatch := secDo(t, srv.URL, "alice", secKey, `{"a":2}`)
	assert.Equal(t, http.StatusUnprocessableEntity, mismatch.status)
	problems = append(problems, mismatch)
	invalid := secDo(t, srv.URL, "alice", secKey+" with a space", `{}`)
	assert.Equal(t, http.StatusBadRequest, invalid.status)
	problems = append(problems, invalid)
	tooLong := secDo(t, srv.URL, "alice", secKey+strings.Repeat("x", 300), `{}`)
	assert.Equal(t, http.StatusBadRequest, tooLong.status)
	problems = append(problems, tooLong)

	// A conflict: one request in flight, another with the same key.
	slow.Store(true)
	done := make(chan faultResult, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/payments", strings.NewReader(`{}`))
		req.Header.Set("X-User", "bob")
		req.Header.Set("Idempotency-Key", secKey)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		done <- faultResult{}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the first request never reached the handler")
	}
	conflict := secDo(t, srv.URL, "bob", secKey, `{}`)
	assert.Equal(t, http.StatusConflict, conflict.status)
	problems = append(problems, conflict)
	unblock()
	<-done

	// Store errors: Redis goes away.
	m.Close()
	unavailable := secDo(t, srv.URL, "carol", secKey, `{}`)
	assert.Equal(t, http.StatusServiceUnavailable, unavailable.status)
	problems = append(problems, unavailable)
	m.Restart() // miniredis.RunT closes it at the end of the test.

	for _, p := range problems {
		assert.Equal(t, "application/problem+json", p.header.Get("Content-Type"))
		assert.NotContains(t, p.body, "SECRET", "a problem response (%d) echoes the key", p.status)
	}

	hashed := regexp.MustCompile(`^sec:[0-9a-f]{64}$`)
	keys := m.Keys()
	require.NotEmpty(t, keys)
	for _, k := range keys {
		assert.Regexp(t, hashed, k)
		assert.NotContains(t, k, "SECRET")
		v, err := m.Get(k)
		require.NoError(t, err)
		assert.NotContains(t, v, "SECRET", "a stored value holds the key")
	}
	assert.ElementsMatch(t, []string{
		"sec:" + idempotency.StorageKey("alice", secKey),
		"sec:" + idempotency.StorageKey("bob", secKey),
	}, keys)

	events.mu.Lock()
	defer events.mu.Unlock()
	seen := map[idempotency.Outcome]bool{}
	for _, ev := range events.all {
		seen[ev.Outcome] = true
		fields := fmt.Sprintf("%v %q %d %v %q %v", ev.Outcome, ev.StorageKey, ev.Status, ev.Err, ev.Detail, ev.Duration)
		assert.NotContains(t, fields, "SECRET", "an event (%v) holds the key in clear", ev.Outcome)
		if ev.StorageKey != "" {
			assert.Len(t, ev.StorageKey, 64)
		}
	}
	for _, o := range []idempotency.Outcome{
		idempotency.OutcomeExecuted, idempotency.OutcomeReplayed, idempotency.OutcomeMismatch,
		idempotency.OutcomeKeyInvalid, idempotency.OutcomeConflict, idempotency.OutcomeStoreError,
	} {
		assert.True(t, seen[o], "no %v event was checked", o)
	}
}
