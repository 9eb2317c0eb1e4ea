package idempotency_test

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

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// txFakeStore is a TxStore in memory: a key is locked by the transaction
// that began on it, and a transaction's writes (rows in a table of its
// own) become visible only when it commits.
type txFakeStore struct {
	*idempotency.MemoryStore

	mu       sync.Mutex
	locked   map[string]bool
	records  map[string]*idempotency.Record
	rows     []string // committed business writes
	begins   atomic.Int64
	rolled   atomic.Int64
	beginErr error
	// busyRolled counts the rollbacks of transactions that found their key
	// busy; onBusyRollback, when set, runs at each.
	busyRolled     atomic.Int64
	onBusyRollback func()
	// commitHook, when set, decides a commit's outcome instead of the store.
	commitHook func(tx *txFake) (*idempotency.Record, error)
	// onCall, when set, sees the context of each Begin ("begin") and
	// Commit ("commit"); an error it returns is the call's.
	onCall func(op string, ctx context.Context) error
}

func newTxFakeStore() *txFakeStore {
	return &txFakeStore{MemoryStore: idempotency.NewMemoryStore(), locked: map[string]bool{}, records: map[string]*idempotency.Record{}}
}

func (s *txFakeStore) Transactional() bool { return true }

func (s *txFakeStore) Begin(ctx context.Context, key string) (idempotency.StoreTx, *idempotency.Record, error) {
	s.begins.Add(1)
	if s.beginErr != nil {
		return nil, nil, s.beginErr
	}
	if s.onCall != nil {
		if err := s.onCall("begin", ctx); err != nil {
			return nil, nil, err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.locked[key] {
		return &txFake{s: s, key: key, busy: true}, nil, idempotency.ErrKeyBusy
	}
	s.locked[key] = true
	return &txFake{s: s, key: key}, s.records[key], nil
}

func (s *txFakeStore) committedRows() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.rows...)
}

// txFake is a transaction of a txFakeStore.
type txFake struct {
	s       *txFakeStore
	key     string
	mu      sync.Mutex
	rows    []string
	aborted bool
	ended   bool
	busy    bool // began, but found the key locked: holds nothing
}

type txCtxKey struct{}

// txFrom returns the transaction a handler runs in, or nil.
func txFrom(ctx context.Context) *txFake {
	tx, _ := ctx.Value(txCtxKey{}).(*txFake)
	return tx
}

func (tx *txFake) insert(row string) {
	tx.mu.Lock()
	defer tx.mu.Unlock()
	tx.rows = append(tx.rows, row)
}

func (tx *txFake) Context(ctx context.Context) context.Context {
	return context.WithValue(ctx, txCtxKey{}, tx)
}

func (tx *txFake) Aborted() bool {
	tx.mu.Lock()
	defer tx.mu.Unlock()
	return tx.aborted
}

func (tx *txFake) Commit(ctx context.Context, rec *idempotency.Record, _ time.Duration) (*idempotency.Record, error) {
	if tx.s.onCall != nil {
		if err := tx.s.onCall("commit", ctx); err != nil {
			tx.end(nil, nil)
			return nil, err
		}
	}
	if tx.s.commitHook != nil {
		live, err := tx.s.commitHook(tx)
		if live != nil || err != nil {
			tx.end(nil, nil)
			return live, err
		}
	}
	tx.end(rec, tx.rows)
	return nil, nil
}

func (tx *txFake) Rollback(context.Context) error {
	if tx.busy {
		tx.s.busyRolled.Add(1)
		if tx.s.onBusyRollback != nil {
			tx.s.onBusyRollback()
		}
		return nil
	}
	tx.mu.Lock()
	ended := tx.ended
	tx.mu.Unlock()
	if !ended {
		tx.s.rolled.Add(1)
		tx.end(nil, nil)
	}
	return nil
}

// end ends the transaction, keeping rec and rows when it commits.
func (tx *txFake) end(rec *idempotency.Record, rows []string) {
	tx.mu.Lock()
	tx.ended = true
	tx.mu.Unlock()
	s := tx.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if rec != nil {
		s.records[tx.key] = rec
		s.rows = append(s.rows, rows...)
	}
	delete(s.locked, tx.key)
}

// txOrders is a handler that inserts an order row in its transaction and
// answers 201, or what the request's X-Answer header says.
func txOrders(runs *atomic.Int64) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		n := runs.Add(1)
		body, _ := io.ReadAll(r.Body)
		if tx := txFrom(r.Context()); tx != nil {
			tx.insert(string(body))
		}
		switch r.Header.Get("X-Answer") {
		case "500":
			w.WriteHeader(http.StatusInternalServerError)
			return
		case "abort":
			txFrom(r.Context()).mu.Lock()
			txFrom(r.Context()).aborted = true
			txFrom(r.Context()).mu.Unlock()
		case "abort-404":
			txFrom(r.Context()).mu.Lock()
			txFrom(r.Context()).aborted = true
			txFrom(r.Context()).mu.Unlock()
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, `{"order":`+string(rune('0'+n))+`}`)
	}
}

func txDo(h http.Handler, key, body string, header ...string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader(body))
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w
}

func txProblemType(t *testing.T, w *httptest.ResponseRecorder) string {
	t.Helper()
	var p struct{ Type string }
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &p), w.Body.String())
	return strings.TrimPrefix(p.Type, "https://github.com/f8e778d0/idempotency#")
}

func TestTxFirstExecutionCommitsWritesAndResponse(t *testing.T) {
	st := newTxFakeStore()
	var runs atomic.Int64
	h := idempotency.New(idempotency.Config{Store: st})(txOrders(&runs))

	first := txDo(h, "k", "book")
	assert.Equal(t, http.StatusCreated, first.Code)
	assert.Equal(t, `{"order":1}`, first.Body.String())
	assert.Equal(t, []string{"book"}, st.committedRows())

	retry := txDo(h, "k", "book")
	assert.Equal(t, http.StatusCreated, retry.Code)
	assert.Equal(t, "true", retry.Header().Get(idempotency.ReplayedHeader))
	assert.Equal(t, first.Body.String(), retry.Body.String())
	assert.EqualValues(t, 1, st.rolled.Load(), "the replay's transaction is rolled back")

	assert.Equal(t, http.StatusUnprocessableEntity, txDo(h, "k", "pen").Code)
	assert.EqualValues(t, 1, runs.Load())
	assert.Equal(t, []string{"book"}, st.committedRows())
	assert.Empty(t, st.locked, "every transaction ended")
}

func TestTxBusyKeyIsAConflict(t *testing.T) {
	st := newTxFakeStore()
	var runs atomic.Int64
	h := idempotency.New(idempotency.Config{Store: st, RetryAfter: 3 * time.Second})(txOrders(&runs))
	st.locked[idempotency.StorageKey("", "k")] = true
	req := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader("book"))
	req.Header.Set("Idempotency-Key", "k")
	w := httptest.NewRecorder()
	answered := false
	st.onBusyRollback = func() { answered = w.Body.Len() > 0 }
	h.ServeHTTP(w, req)
	assert.Equal(t, http.StatusConflict, w.Code)
	assert.Equal(t, "3", w.Header().Get("Retry-After"))
	assert.Equal(t, idempotency.ProblemInProgress, txProblemType(t, w))
	assert.Zero(t, runs.Load())
	assert.EqualValues(t, 1, st.busyRolled.Load(), "the busy transaction is rolled back")
	assert.True(t, answered, "the rollback is sent after the 409 was written")
}

func TestTxWaitModePollsUntilTheKeyIsFree(t *testing.T) {
	st := newTxFakeStore()
	var runs atomic.Int64
	h := idempotency.New(idempotency.Config{Store: st, WaitForInFlight: 2 * time.Second})(txOrders(&runs))
	skey := idempotency.StorageKey("", "k")
	st.locked[skey] = true
	go func() {
		time.Sleep(50 * time.Millisecond)
		st.mu.Lock()
		delete(st.locked, skey)
		st.mu.Unlock()
	}()
	w := txDo(h, "k", "book")
	assert.Equal(t, http.StatusCreated, w.Code)
	assert.Greater(t, st.begins.Load(), int64(1), "Begin was polled")
	assert.Equal(t, st.begins.Load()-1, st.busyRolled.Load(), "each busy attempt was rolled back before the next")
	assert.EqualValues(t, 1, runs.Load())
}

func TestTxRollsBack(t *testing.T) {
	tests := []struct {
		name       string
		answer     string
		wantStatus int
		wantType   string
	}{
		{"server error", "500", http.StatusInternalServerError, ""},
		{"aborted transaction with a success", "abort", http.StatusInternalServerError, idempotency.ProblemNotCommitted},
		{"aborted transaction with a client error", "abort-404", http.StatusNotFound, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := newTxFakeStore()
			var runs atomic.Int64
			h := idempotency.New(idempotency.Config{Store: st})(txOrders(&runs))
			w := txDo(h, "k", "book", "X-Answer", tt.answer)
			assert.Equal(t, tt.wantStatus, w.Code)
			if tt.wantType != "" {
				assert.Equal(t, tt.wantType, txProblemType(t, w))
			}
			assert.Empty(t, st.committedRows(), "nothing committed")
			assert.EqualValues(t, 1, st.rolled.Load())

			// The retry runs afresh and commits.
			assert.Equal(t, http.StatusCreated, txDo(h, "k", "book").Code)
			assert.EqualValues(t, 2, runs.Load())
			assert.Equal(t, []string{"book"}, st.committedRows())
		})
	}
}

func TestTxPanicRollsBackAndPropagates(t *testing.T) {
	st := newTxFakeStore()
	h := idempotency.New(idempotency.Config{Store: st})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		txFrom(r.Context()).insert("half")
		panic("boom")
	}))
	assert.PanicsWithValue(t, "boom", func() { txDo(h, "k", "x") })
	assert.EqualValues(t, 1, st.rolled.Load())
	assert.Empty(t, st.committedRows())
	assert.Empty(t, st.locked)
}

func TestTxCommitFailures(t *testing.T) {
	t.Run("not committed", func(t *testing.T) {
		st := newTxFakeStore()
		st.commitHook = func(*txFake) (*idempotency.Record, error) {
			return nil, errors.Join(idempotency.ErrNotCommitted, errors.New("connection lost during COMMIT"))
		}
		var runs atomic.Int64
		var events []idempotency.Event
		h := idempotency.New(idempotency.Config{Store: st, Observer: func(e idempotency.Event) { events = append(events, e) }})(txOrders(&runs))
		w := txDo(h, "k", "book")
		assert.Equal(t, http.StatusServiceUnavailable, w.Code)
		assert.Equal(t, idempotency.ProblemNotCommitted, txProblemType(t, w))
		assert.NotEmpty(t, w.Header().Get("Retry-After"))
		assert.NotContains(t, w.Body.String(), "connection lost", "internal error text never reaches the client")
		assert.Empty(t, st.locked)
		require.NotEmpty(t, events)
		assert.Equal(t, idempotency.OutcomeNotCommitted, events[len(events)-1].Outcome)
	})
	t.Run("completed by another request first", func(t *testing.T) {
		st := newTxFakeStore()
		var runs atomic.Int64
		h := idempotency.New(idempotency.Config{Store: st})(txOrders(&runs))
		other := txDo(idempotency.New(idempotency.Config{Store: newTxFakeStore()})(txOrders(new(atomic.Int64))), "k", "book")
		require.Equal(t, http.StatusCreated, other.Code)
		st.commitHook = func(*txFake) (*idempotency.Record, error) {
			return &idempotency.Record{State: idempotency.StateCompleted, Response: idempotency.Response{
				StatusCode: http.StatusCreated, Header: http.Header{"Content-Type": {"application/json"}}, Body: []byte(`{"order":"theirs"}`),
			}}, nil
		}
		w := txDo(h, "k", "book")
		assert.Equal(t, http.StatusCreated, w.Code)
		assert.Equal(t, `{"order":"theirs"}`, w.Body.String())
		assert.Equal(t, "true", w.Header().Get(idempotency.ReplayedHeader))
		assert.Empty(t, st.committedRows(), "this request's writes were rolled back")
	})
}

// TestTxStoreCallsBoundedByStoreTimeout proves how Begin and Commit are
// bounded on a transactional store: each call's context carries the
// request's values and a deadline no later than StoreTimeout after the call
// started (and no earlier than 15/16 of it: calls share deadlines), the
// client hanging up cancels Begin but not Commit, and a Begin or a Commit
// that hangs is answered 503 once its deadline passed.
func TestTxStoreCallsBoundedByStoreTimeout(t *testing.T) {
	const timeout = 400 * time.Millisecond
	type valueKey struct{}
	withValue := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), valueKey{}, "request")))
		})
	}

	t.Run("context", func(t *testing.T) {
		st := newTxFakeStore()
		seen := map[string]bool{}
		st.onCall = func(op string, ctx context.Context) error {
			seen[op] = true
			end, ok := ctx.Deadline()
			left := time.Until(end)
			assert.True(t, ok, op)
			assert.True(t, left <= timeout && left > timeout-timeout/16-50*time.Millisecond, "%s: %v left", op, left)
			assert.Equal(t, "request", ctx.Value(valueKey{}), op)
			assert.NoError(t, ctx.Err(), op)
			return nil
		}
		var cancelRequest context.CancelFunc
		handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			cancelRequest() // the client hangs up
			w.WriteHeader(http.StatusCreated)
		})
		h := withValue(idempotency.New(idempotency.Config{Store: st, StoreTimeout: timeout})(handler))
		ctx, cancel := context.WithCancel(context.Background())
		cancelRequest = cancel
		r := httptest.NewRequestWithContext(ctx, http.MethodPost, "/orders", strings.NewReader("{}"))
		r.Header.Set("Idempotency-Key", "k")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		assert.Equal(t, http.StatusCreated, w.Code)
		assert.Equal(t, map[string]bool{"begin": true, "commit": true}, seen)
	})

	t.Run("client gone during begin", func(t *testing.T) {
		st := newTxFakeStore()
		entered := make(chan struct{})
		var beginErr error
		st.onCall = func(op string, ctx context.Context) error {
			if op == "begin" {
				close(entered)
				<-ctx.Done()
				beginErr = ctx.Err()
				return beginErr
			}
			return nil
		}
		var runs atomic.Int64
		h := idempotency.New(idempotency.Config{Store: st, StoreTimeout: time.Minute})(txOrders(&runs))
		ctx, cancel := context.WithCancel(context.Background())
		r := httptest.NewRequestWithContext(ctx, http.MethodPost, "/orders", strings.NewReader("{}"))
		r.Header.Set("Idempotency-Key", "k")
		go func() {
			<-entered
			cancel()
		}()
		done := make(chan struct{})
		go func() {
			h.ServeHTTP(httptest.NewRecorder(), r)
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Begin went on after the client hung up")
		}
		assert.ErrorIs(t, beginErr, context.Canceled)
		assert.Zero(t, runs.Load(), "the handler did not run for a client that left")
	})

	hang := func(op string) func(string, context.Context) error {
		return func(call string, ctx context.Context) error {
			if call != op {
				return nil
			}
			<-ctx.Done()
			if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("%s ended with %v, want the deadline", op, ctx.Err())
			}
			return fmt.Errorf("%w: %s: %w", idempotency.ErrNotCommitted, op, ctx.Err())
		}
	}
	for _, c := range []struct{ op, problem string }{
		{"begin", idempotency.ProblemStoreUnavailable},
		{"commit", idempotency.ProblemNotCommitted},
	} {
		t.Run(c.op+" hangs", func(t *testing.T) {
			st := newTxFakeStore()
			st.onCall = hang(c.op)
			var runs atomic.Int64
			h := idempotency.New(idempotency.Config{Store: st, StoreTimeout: timeout})(txOrders(&runs))
			start := time.Now()
			w := txDo(h, "k", "x")
			took := time.Since(start)
			assert.Equal(t, http.StatusServiceUnavailable, w.Code)
			assert.Equal(t, c.problem, txProblemType(t, w))
			assert.GreaterOrEqual(t, took, timeout-timeout/16-50*time.Millisecond)
			assert.Less(t, took, 10*timeout, "the call was bounded")
			assert.Empty(t, st.committedRows())
		})
	}
}

func TestTxResponseIsHeldUntilCommit(t *testing.T) {
	st := newTxFakeStore()
	var flushed, hijackErr error
	var sawFlush bool
	rec := httptest.NewRecorder()
	h := idempotency.New(idempotency.Config{Store: st})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, "part")
		flushed = http.NewResponseController(w).Flush()
		sawFlush = rec.Flushed || rec.Code != http.StatusOK || rec.Body.Len() > 0
		_, _, hijackErr = http.NewResponseController(w).Hijack()
		_, _ = io.WriteString(w, "-rest")
	}))
	req := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("x"))
	req.Header.Set("Idempotency-Key", "k")
	h.ServeHTTP(rec, req)
	assert.NoError(t, flushed, "Flush is a no-op")
	assert.False(t, sawFlush, "nothing reached the client before the commit")
	assert.ErrorIs(t, hijackErr, http.ErrNotSupported)
	assert.Equal(t, http.StatusCreated, rec.Code)
	assert.Equal(t, "part-rest", rec.Body.String())
	assert.Equal(t, "9", rec.Header().Get("Content-Length"))
}

func TestTxOversizeResponseRollsBack(t *testing.T) {
	st := newTxFakeStore()
	h := idempotency.New(idempotency.Config{Store: st, MaxResponseSize: 8})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		txFrom(r.Context()).insert("row")
		_, _ = io.WriteString(w, "more than eight bytes")
	}))
	w := txDo(h, "k", "x")
	assert.Equal(t, http.StatusInternalServerError, w.Code)
	assert.Equal(t, idempotency.ProblemNotCommitted, txProblemType(t, w))
	assert.Empty(t, st.committedRows())
}

func TestTxBeginFailureIsUnavailable(t *testing.T) {
	st := newTxFakeStore()
	st.beginErr = errors.New("pool exhausted")
	var runs atomic.Int64
	h := idempotency.New(idempotency.Config{Store: st})(txOrders(&runs))
	w := txDo(h, "k", "x")
	assert.Equal(t, http.StatusServiceUnavailable, w.Code)
	assert.Equal(t, idempotency.ProblemStoreUnavailable, txProblemType(t, w))
	assert.Zero(t, runs.Load())
}

func TestTxFailOpenPanics(t *testing.T) {
	assert.PanicsWithValue(t, "idempotency: FailOpen cannot be used with a transactional store: there would be no transaction for the handler", func() {
		idempotency.New(idempotency.Config{Store: newTxFakeStore(), FailOpen: true})
	})
}

func TestTxNestedInsideALeaseInstancePassesThrough(t *testing.T) {
	st := newTxFakeStore()
	var runs atomic.Int64
	var inTx atomic.Bool
	inner := idempotency.New(idempotency.Config{Store: st})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inTx.Store(txFrom(r.Context()) != nil)
		txOrders(&runs)(w, r)
	}))
	h := idempotency.New(idempotency.Config{})(inner)
	assert.Equal(t, http.StatusCreated, txDo(h, "k", "book").Code)
	assert.True(t, txDo(h, "k", "book").Header().Get(idempotency.ReplayedHeader) == "true")
	assert.Zero(t, st.begins.Load(), "the inner instance passed the claimed request through")
	assert.False(t, inTx.Load(), "no transaction for a request the outer instance holds")
	assert.EqualValues(t, 1, runs.Load())
}

// TestTxReviewCases covers what a review of the transactional path found:
// each case failed before its fix.
func TestTxReviewCases(t *testing.T) {
	t.Run("an observer that panics on a replay still rolls back", func(t *testing.T) {
		st := newTxFakeStore()
		var runs atomic.Int64
		require.Equal(t, http.StatusCreated, txDo(idempotency.New(idempotency.Config{Store: st})(txOrders(&runs)), "k", "book").Code)
		h := idempotency.New(idempotency.Config{Store: st, Observer: func(e idempotency.Event) {
			if e.Outcome == idempotency.OutcomeReplayed {
				panic("observer")
			}
		}})(txOrders(&runs))
		assert.PanicsWithValue(t, "observer", func() { txDo(h, "k", "book") })
		assert.EqualValues(t, 1, st.rolled.Load(), "the replay's transaction was rolled back")
		assert.Empty(t, st.locked, "the key is free")
	})
	t.Run("the first client gets the headers that are not stored", func(t *testing.T) {
		st := newTxFakeStore()
		h := idempotency.New(idempotency.Config{Store: st})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.SetCookie(w, &http.Cookie{Name: "session", Value: "abc"})
			w.WriteHeader(http.StatusCreated)
		}))
		first := txDo(h, "k", "book")
		assert.Equal(t, "session=abc", first.Header().Get("Set-Cookie"))
		retry := txDo(h, "k", "book")
		assert.Equal(t, "true", retry.Header().Get(idempotency.ReplayedHeader))
		assert.Empty(t, retry.Header().Get("Set-Cookie"), "never replayed")
	})
	t.Run("a key claimed under a lease at commit time is a conflict", func(t *testing.T) {
		st := newTxFakeStore()
		st.commitHook = func(*txFake) (*idempotency.Record, error) {
			return &idempotency.Record{State: idempotency.StateInFlight, Token: "lease", LeaseRemaining: time.Second}, nil
		}
		var runs atomic.Int64
		w := txDo(idempotency.New(idempotency.Config{Store: st})(txOrders(&runs)), "k", "book")
		assert.Equal(t, http.StatusConflict, w.Code)
		assert.Equal(t, idempotency.ProblemInProgress, txProblemType(t, w))
		assert.Empty(t, st.committedRows())
	})
	t.Run("a 5xx rolls back even when ShouldStore accepts it", func(t *testing.T) {
		st := newTxFakeStore()
		var runs atomic.Int64
		h := idempotency.New(idempotency.Config{Store: st, ShouldStore: func(int) bool { return true }})(txOrders(&runs))
		assert.Equal(t, http.StatusInternalServerError, txDo(h, "k", "book", "X-Answer", "500").Code)
		assert.Empty(t, st.committedRows())
		assert.Equal(t, http.StatusCreated, txDo(h, "k", "book").Code, "the retry runs")
	})
	t.Run("the 409 reaches the client before the rollback ends", func(t *testing.T) {
		st := newTxFakeStore()
		st.locked[idempotency.StorageKey("", "k")] = true
		st.onBusyRollback = func() { time.Sleep(time.Second) }
		var runs atomic.Int64
		srv := httptest.NewServer(idempotency.New(idempotency.Config{Store: st})(txOrders(&runs)))
		defer srv.Close()
		req, err := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader("book"))
		require.NoError(t, err)
		req.Header.Set("Idempotency-Key", "k")
		start := time.Now()
		resp, err := srv.Client().Do(req)
		require.NoError(t, err)
		_, err = io.ReadAll(resp.Body)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusConflict, resp.StatusCode)
		assert.Less(t, time.Since(start), 800*time.Millisecond, "the client did not wait for the rollback")
	})
}
