package idempotency_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// slogSecretKey is the client key the tests send; it must never appear in
// a log line.
const slogSecretKey = "sekrit-4a7f-client-key"

// slogBuffer is a concurrency-safe buffer for a JSON slog handler.
type slogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *slogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *slogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// lines decodes every JSON record written so far.
func (b *slogBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(b.String()))
	for sc.Scan() {
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), "line %q", sc.Text())
		out = append(out, m)
	}
	return out
}

// newSlogLogger returns a JSON logger at level writing to a new buffer.
func newSlogLogger(level slog.Level) (*slog.Logger, *slogBuffer) {
	buf := &slogBuffer{}
	return slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: level})), buf
}

// slogFaultyStore is a memory store whose Claim or Complete can be made to
// fail.
type slogFaultyStore struct {
	*idempotency.MemoryStore
	claimErr    error
	completeErr error
}

func (s *slogFaultyStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	if s.claimErr != nil {
		return nil, s.claimErr
	}
	return s.MemoryStore.Claim(ctx, key, token, lease)
}

func (s *slogFaultyStore) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	if s.completeErr != nil {
		return s.completeErr
	}
	return s.MemoryStore.Complete(ctx, key, token, rec, ttl)
}

// slogSend serves one request through h and returns its status.
func slogSend(h http.Handler, method, path, key, body string) int {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	if key != "" {
		r.Header.Set("Idempotency-Key", key)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w.Code
}

func TestSlogObserverOutcomes(t *testing.T) {
	created := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte("created"))
	})
	tests := []struct {
		name    string
		cfg     func(*idempotency.Config)
		handler http.Handler
		send    func(h http.Handler)
		level   string
		outcome string
		status  float64
		attrs   []string // further attributes that must be present
	}{
		{
			name:    "executed",
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", slogSecretKey, "a") },
			level:   "INFO",
			outcome: "executed",
			status:  201,
			attrs:   []string{"duration", "storage_key"},
		},
		{
			name: "replayed",
			send: func(h http.Handler) {
				slogSend(h, "POST", "/orders", slogSecretKey, "a")
				slogSend(h, "POST", "/orders", slogSecretKey, "a")
			},
			level:   "INFO",
			outcome: "replayed",
			status:  201,
			attrs:   []string{"storage_key"},
		},
		{
			name: "mismatch",
			send: func(h http.Handler) {
				slogSend(h, "POST", "/orders", slogSecretKey, "a")
				slogSend(h, "POST", "/orders", slogSecretKey, "b")
			},
			level:   "INFO",
			outcome: "mismatch",
			status:  422,
			attrs:   []string{"storage_key"},
		},
		{
			name:    "key missing",
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", "", "a") },
			level:   "DEBUG",
			outcome: "key_missing",
		},
		{
			name:    "key missing and required",
			cfg:     func(c *idempotency.Config) { c.RequireKey = true },
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", "", "a") },
			level:   "INFO",
			outcome: "key_missing",
			status:  400,
		},
		{
			name:    "key invalid",
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", slogSecretKey+" x", "a") },
			level:   "INFO",
			outcome: "key_invalid",
			status:  400,
			attrs:   []string{"detail"},
		},
		{
			name:    "released",
			handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusInternalServerError) }),
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", slogSecretKey, "a") },
			level:   "INFO",
			outcome: "released",
			status:  500,
		},
		{
			name: "store error",
			cfg: func(c *idempotency.Config) {
				c.Store = &slogFaultyStore{MemoryStore: idempotency.NewMemoryStore(), claimErr: errors.New("dial tcp: connection refused")}
			},
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", slogSecretKey, "a") },
			level:   "WARN",
			outcome: "store_error",
			status:  503,
			attrs:   []string{"err", "storage_key"},
		},
		{
			name: "store full",
			cfg: func(c *idempotency.Config) {
				c.Store = idempotency.NewMemoryStore(idempotency.WithMaxEntries(1))
			},
			send: func(h http.Handler) {
				slogSend(h, "POST", "/orders", "other-key", "a")
				slogSend(h, "POST", "/orders", slogSecretKey, "a")
			},
			level:   "WARN",
			outcome: "store_full",
			status:  503,
			attrs:   []string{"err"},
		},
		{
			name: "lease lost",
			cfg: func(c *idempotency.Config) {
				c.Store = &slogFaultyStore{MemoryStore: idempotency.NewMemoryStore(), completeErr: idempotency.ErrNotOwner}
			},
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", slogSecretKey, "a") },
			level:   "ERROR",
			outcome: "lease_lost",
			attrs:   []string{"err", "storage_key"},
		},
		{
			name:    "not stored",
			cfg:     func(c *idempotency.Config) { c.MaxResponseSize = 3 },
			send:    func(h http.Handler) { slogSend(h, "POST", "/orders", slogSecretKey, "a") },
			level:   "WARN",
			outcome: "not_stored",
			status:  201,
			attrs:   []string{"detail", "duration"},
		},
		{
			name: "not stored replay",
			cfg:  func(c *idempotency.Config) { c.MaxResponseSize = 3 },
			send: func(h http.Handler) {
				slogSend(h, "POST", "/orders", slogSecretKey, "a")
				slogSend(h, "POST", "/orders", slogSecretKey, "a")
			},
			level:   "WARN",
			outcome: "not_stored_replay",
			status:  500,
			attrs:   []string{"detail"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logger, buf := newSlogLogger(slog.LevelDebug)
			cfg := idempotency.Config{Observer: idempotency.SlogObserver(logger)}
			if tt.cfg != nil {
				tt.cfg(&cfg)
			}
			handler := tt.handler
			if handler == nil {
				handler = created
			}
			tt.send(idempotency.New(cfg)(handler))

			out := buf.String()
			assert.NotContains(t, out, slogSecretKey, "the client key never appears in clear")
			lines := buf.lines(t)
			require.NotEmpty(t, lines)
			last := lines[len(lines)-1]
			for _, line := range lines {
				assert.Equal(t, "idempotency", line["msg"])
				assert.Equal(t, "POST", line["method"])
				assert.Equal(t, "/orders", line["path"])
			}
			assert.Equal(t, tt.outcome, last["outcome"])
			assert.Equal(t, tt.level, last["level"])
			if tt.status != 0 {
				assert.Equal(t, tt.status, last["status"])
			} else {
				assert.NotContains(t, last, "status")
			}
			for _, a := range tt.attrs {
				assert.Contains(t, last, a)
			}
			if sk, ok := last["storage_key"]; ok && tt.outcome != "store_full" {
				assert.Equal(t, idempotency.StorageKey("", slogSecretKey), sk)
			}
		})
	}
}

func TestSlogObserverConflict(t *testing.T) {
	logger, buf := newSlogLogger(slog.LevelInfo)
	started, release := make(chan struct{}), make(chan struct{})
	h := idempotency.New(idempotency.Config{Observer: idempotency.SlogObserver(logger)})(
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(started)
			<-release
			w.WriteHeader(http.StatusCreated)
		}))
	done := make(chan struct{})
	go func() {
		defer close(done)
		slogSend(h, "POST", "/orders", slogSecretKey, "a")
	}()
	<-started
	assert.Equal(t, http.StatusConflict, slogSend(h, "POST", "/orders", slogSecretKey, "a"))
	close(release)
	<-done

	assert.NotContains(t, buf.String(), slogSecretKey)
	var outcomes []any
	for _, line := range buf.lines(t) {
		outcomes = append(outcomes, line["outcome"])
	}
	assert.Equal(t, []any{"conflict", "executed"}, outcomes)
}

func TestSlogObserverLevelFilter(t *testing.T) {
	logger, buf := newSlogLogger(slog.LevelWarn)
	observe := idempotency.SlogObserver(logger)
	r := httptest.NewRequest("POST", "/orders", nil)
	observe(idempotency.Event{Outcome: idempotency.OutcomeReplayed, Request: r, Status: 201})
	observe(idempotency.Event{Outcome: idempotency.OutcomeKeyMissing, Request: r})
	assert.Empty(t, buf.String(), "Info and Debug are below Warn")

	observe(idempotency.Event{Outcome: idempotency.OutcomeStoreError, Request: r, Err: errors.New("timeout")})
	lines := buf.lines(t)
	require.Len(t, lines, 1)
	assert.Equal(t, "timeout", lines[0]["err"])

	allocs := testing.AllocsPerRun(100, func() {
		observe(idempotency.Event{Outcome: idempotency.OutcomeReplayed, Request: r, Status: 201})
	})
	assert.Zero(t, allocs, "a filtered-out record costs no allocation")
}

// A RequireKey rejection is visible at the default level; a key merely
// absent on a route that does not require one is not.
func TestSlogObserverRequiredKeyAtInfo(t *testing.T) {
	logger, buf := newSlogLogger(slog.LevelInfo)
	optional := idempotency.New(idempotency.Config{Observer: idempotency.SlogObserver(logger)})(http.NotFoundHandler())
	required := idempotency.New(idempotency.Config{RequireKey: true, Observer: idempotency.SlogObserver(logger)})(http.NotFoundHandler())

	assert.Equal(t, http.StatusNotFound, slogSend(optional, "POST", "/orders", "", "a"))
	assert.Empty(t, buf.String(), "an optional key's absence stays at Debug")

	assert.Equal(t, http.StatusBadRequest, slogSend(required, "POST", "/orders", "", "a"))
	lines := buf.lines(t)
	require.Len(t, lines, 1)
	assert.Equal(t, "INFO", lines[0]["level"])
	assert.Equal(t, "key_missing", lines[0]["outcome"])
	assert.Equal(t, float64(http.StatusBadRequest), lines[0]["status"])
}

func TestSlogObserverWithoutRequest(t *testing.T) {
	logger, buf := newSlogLogger(slog.LevelDebug)
	idempotency.SlogObserver(logger)(idempotency.Event{Outcome: idempotency.OutcomeLeaseLost})
	lines := buf.lines(t)
	require.Len(t, lines, 1)
	assert.Equal(t, "lease_lost", lines[0]["outcome"])
	assert.NotContains(t, lines[0], "method")
}

func TestSlogObserverNilLogger(t *testing.T) {
	assert.PanicsWithValue(t, "idempotency: SlogObserver needs a non-nil logger", func() {
		idempotency.SlogObserver(nil)
	})
}
