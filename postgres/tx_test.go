package postgres_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

// The tests of the one-transaction mode (postgres.Transactional) run the
// middleware over HTTP against a real PostgreSQL. Their handlers write to an
// orders table with no unique constraint through postgres.Tx, so that only
// the middleware stands between a retried request and a second order row.

// txEnv is what the instances of a one-transaction test share, as the
// processes of one service would: a records table, an orders table, and a
// pool of its own to inspect both.
type txEnv struct {
	admin   *pgxpool.Pool
	table   string // the records table, as given to WithTable
	records string // the records table, quoted
	orders  string // the orders table, quoted
}

// newTxEnv creates the two tables; both are dropped when the test ends.
func newTxEnv(t *testing.T) *txEnv {
	t.Helper()
	cfg := poolConfig(t)
	cfg.MaxConns = 3
	admin := newPool(t, cfg)
	e := &txEnv{admin: admin, table: randomTable(t, admin)}
	e.records = pgx.Identifier{e.table}.Sanitize()
	e.orders = pgx.Identifier{randomTable(t, admin)}.Sanitize()
	require.NoError(t, postgres.NewStore(admin, postgres.WithTable(e.table)).Migrate(t.Context()))
	_, err := admin.Exec(t.Context(), `CREATE TABLE `+e.orders+` (
	id bigserial,
	key text NOT NULL,
	account text NOT NULL DEFAULT 'main',
	amount int NOT NULL CHECK (amount > 0),
	body text NOT NULL DEFAULT ''
)`)
	require.NoError(t, err)
	return e
}

// pool opens a pool of at most maxConns connections, as another process
// would have its own.
func (e *txEnv) pool(t *testing.T, maxConns int32) *pgxpool.Pool {
	t.Helper()
	cfg := poolConfig(t)
	cfg.MaxConns = maxConns
	return newPool(t, cfg)
}

// store returns a store on e's records table in the one-transaction mode.
func (e *txEnv) store(pool *pgxpool.Pool, opts ...postgres.Option) *postgres.Store {
	return postgres.NewStore(pool, append([]postgres.Option{postgres.WithTable(e.table), postgres.Transactional()}, opts...)...)
}

// leaseStore returns a store on e's records table without Transactional.
func (e *txEnv) leaseStore(pool *pgxpool.Pool) *postgres.Store {
	return postgres.NewStore(pool, postgres.WithTable(e.table))
}

// orderAmounts returns the amounts of the committed order rows of a client
// key, in the order they were inserted.
func (e *txEnv) orderAmounts(t *testing.T, key string) []int {
	t.Helper()
	rows, err := e.admin.Query(context.Background(), "SELECT amount FROM "+e.orders+" WHERE key = $1 ORDER BY id", key)
	require.NoError(t, err)
	amounts, err := pgx.CollectRows(rows, pgx.RowTo[int])
	require.NoError(t, err)
	return amounts
}

// orderCount returns how many committed order rows a client key has.
func (e *txEnv) orderCount(t *testing.T, key string) int {
	t.Helper()
	return len(e.orderAmounts(t, key))
}

// record returns the live record of a client key, or nil.
func (e *txEnv) record(t *testing.T, key string) *idempotency.Record {
	t.Helper()
	rec, err := e.leaseStore(e.admin).Get(context.Background(), idempotency.StorageKey("", key))
	require.NoError(t, err)
	return rec
}

// insertOrder writes an order row for the request's key through the
// request's transaction and returns its id.
func (e *txEnv) insertOrder(r *http.Request, amount int, body string) (int64, error) {
	ctx := r.Context()
	tx := postgres.Tx(ctx)
	if tx == nil {
		return 0, errors.New("no transaction in the request's context")
	}
	key, _ := idempotency.KeyFromContext(ctx)
	var id int64
	err := tx.QueryRow(ctx, "INSERT INTO "+e.orders+" (key, amount, body) VALUES ($1, $2, $3) RETURNING id",
		key, amount, body).Scan(&id)
	return id, err
}

// writeOrder answers 201 for order id with a Location, a multi-valued Link
// and a JSON body.
func writeOrder(w http.ResponseWriter, id int64, body string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", fmt.Sprintf("/orders/%d", id))
	w.Header()["Link"] = []string{`</a>; rel="next", </b>; rel="last"`, `</c>; rel="first"`}
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"order":%d,"request":%q}`, id, body)
}

// ordersHandler returns the plain order handler: it reads the body, counts its
// runs, inserts an order and answers 201.
func (e *txEnv) ordersHandler(runs *atomic.Int64) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		runs.Add(1)
		id, err := e.insertOrder(r, 10, string(body))
		if err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		writeOrder(w, id, string(body))
	}
}

// serveTx starts a server running the middleware configured by cfg over h.
func serveTx(t *testing.T, cfg idempotency.Config, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(idempotency.New(cfg)(h))
	t.Cleanup(srv.Close)
	return srv
}

// txResult is a response as a client saw it.
type txResult struct {
	status int
	header http.Header
	body   string
	err    error
}

// replayed reports whether the response carries the replay marker.
func (r txResult) replayed() bool { return r.header.Get(idempotency.ReplayedHeader) == "true" }

// send POSTs body with key to srv; extra holds header names and values.
// It is safe to call from any goroutine.
func send(ctx context.Context, srv *httptest.Server, path, key, body string, extra ...string) txResult {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+path, strings.NewReader(body))
	if err != nil {
		return txResult{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	for i := 0; i+1 < len(extra); i += 2 {
		req.Header.Set(extra[i], extra[i+1])
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		return txResult{err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return txResult{status: resp.StatusCode, header: resp.Header, body: string(b), err: err}
}

// mustSend is send that fails t on a transport error.
func mustSend(t *testing.T, srv *httptest.Server, path, key, body string, extra ...string) txResult {
	t.Helper()
	res := send(t.Context(), srv, path, key, body, extra...)
	require.NoError(t, res.err)
	return res
}

// sendAsync sends in a goroutine; the channel yields the result.
func sendAsync(srv *httptest.Server, path, key, body string, extra ...string) <-chan txResult {
	done := make(chan txResult, 1)
	go func() { done <- send(context.Background(), srv, path, key, body, extra...) }()
	return done
}

// assertProblem checks a problem response of the middleware: its status,
// its type and, for a 503 or a 409, its Retry-After.
func assertProblem(t *testing.T, res txResult, status int, problem string) {
	t.Helper()
	assert.Equal(t, status, res.status, "body %s", res.body)
	assert.Equal(t, "application/problem+json", res.header.Get("Content-Type"))
	if strings.HasPrefix(res.header.Get("Content-Type"), "application/problem+json") {
		assert.True(t, strings.HasSuffix(problemType(t, res.body), "#"+problem), "type of %s", res.body)
	}
	if status == http.StatusServiceUnavailable || status == http.StatusConflict {
		assert.Equal(t, "1", res.header.Get("Retry-After"))
	}
	assert.False(t, res.replayed())
}

// waitFor waits until cond holds, failing t after 5 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// receive waits for a result, failing t after 10 seconds.
func receive(t *testing.T, ch <-chan txResult) txResult {
	t.Helper()
	select {
	case res := <-ch:
		require.NoError(t, res.err)
		return res
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for a response")
		return txResult{}
	}
}

// TestTxCommitAndReplay proves the one-transaction mode's main path over
// HTTP with two instances, each with its own pool, on the same tables: the
// first execution commits the order row and the record in the same
// transaction (they carry the same xmin); a replay on the other instance
// gets the same status, headers and body, marked replayed, and the handler
// does not run again; a different body with the same key gets 422.
func TestTxCommitAndReplay(t *testing.T) {
	e := newTxEnv(t)
	var runs atomic.Int64
	srvA := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, e.ordersHandler(&runs))
	srvB := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, e.ordersHandler(&runs))

	key := randomName("order-")
	first := mustSend(t, srvA, "/orders", key, `{"amount":10}`)
	require.Equal(t, http.StatusCreated, first.status, first.body)
	assert.False(t, first.replayed())
	assert.Equal(t, int64(1), runs.Load())
	assert.Equal(t, 1, e.orderCount(t, key))
	rec := e.record(t, key)
	require.NotNil(t, rec)
	assert.Equal(t, idempotency.StateCompleted, rec.State)
	assert.Equal(t, first.body, string(rec.Response.Body))

	var orderXmin, recordXmin string
	require.NoError(t, e.admin.QueryRow(t.Context(), "SELECT xmin::text FROM "+e.orders+" WHERE key = $1", key).Scan(&orderXmin))
	require.NoError(t, e.admin.QueryRow(t.Context(), "SELECT xmin::text FROM "+e.records+" WHERE key = $1",
		idempotency.StorageKey("", key)).Scan(&recordXmin))
	assert.Equal(t, orderXmin, recordXmin, "the order row and the record were committed by one transaction")

	replay := mustSend(t, srvB, "/orders", key, `{"amount":10}`)
	assert.Equal(t, http.StatusCreated, replay.status)
	assert.True(t, replay.replayed())
	assert.Equal(t, first.body, replay.body)
	for _, name := range []string{"Content-Type", "Location", "Link"} {
		assert.Equal(t, first.header.Values(name), replay.header.Values(name), name)
	}
	assert.Equal(t, int64(1), runs.Load(), "the replay did not run the handler")

	mismatch := mustSend(t, srvB, "/orders", key, `{"amount":99}`)
	assertProblem(t, mismatch, http.StatusUnprocessableEntity, idempotency.ProblemKeyReused)
	assert.Equal(t, int64(1), runs.Load())
	assert.Equal(t, 1, e.orderCount(t, key))
}

// txTracer counts what a pool sends: statements sent alone (Query,
// QueryRow, Exec, a transaction's ROLLBACK) and batches.
type txTracer struct {
	queries, batches atomic.Int64
}

func (c *txTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.queries.Add(1)
	return ctx
}

func (c *txTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (c *txTracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	c.batches.Add(1)
	return ctx
}

func (c *txTracer) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}

func (c *txTracer) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// answerTrips is a ResponseWriter that notes how many round trips had been
// made when the answer started to be written.
type answerTrips struct {
	*httptest.ResponseRecorder
	trips *tripCounter
	at    int64 // -1 until the answer is written
}

func (w *answerTrips) mark() {
	if w.at < 0 {
		w.at = w.trips.n.Load()
	}
}

func (w *answerTrips) WriteHeader(code int) { w.mark(); w.ResponseRecorder.WriteHeader(code) }

func (w *answerTrips) Write(p []byte) (int, error) { w.mark(); return w.ResponseRecorder.Write(p) }

// TestTxRoundTrips counts, once the statements are prepared, what each
// kind of request costs on the wire in the one-transaction mode, in pgx's
// default query mode and in the two modes for poolers without prepared
// statements. A first execution: 1 round trip for BEGIN, the lock and the
// look-up (one batch), the handler's own INSERT, 1 for the record insert
// and COMMIT (one batch): 3, all before the answer. A replay and a
// conflict: the batch, then the ROLLBACK, which is sent after the answer
// was written.
func TestTxRoundTrips(t *testing.T) {
	modes := []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol}
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) { testTxRoundTrips(t, mode) })
	}
}

func testTxRoundTrips(t *testing.T, mode pgx.QueryExecMode) {
	e := newTxEnv(t)
	cfg := poolConfig(t)
	cfg.MaxConns = 1 // one connection, so the warm-up prepares everything on it
	cfg.ConnConfig.DefaultQueryExecMode = mode
	tracer, trips := &txTracer{}, &tripCounter{}
	cfg.ConnConfig.Tracer = tracer
	cfg.ConnConfig.DialFunc = trips.dial
	pool := newPool(t, cfg)
	var runs atomic.Int64
	h := idempotency.New(idempotency.Config{Store: e.store(pool)})(e.ordersHandler(&runs))
	serve := func(key string) *answerTrips {
		r := httptest.NewRequest(http.MethodPost, "/orders", strings.NewReader("{}"))
		r.Header.Set("Idempotency-Key", key)
		w := &answerTrips{ResponseRecorder: httptest.NewRecorder(), trips: trips, at: -1}
		h.ServeHTTP(w, r)
		return w
	}

	// Another process holds a key in its transaction.
	holder := e.store(e.pool(t, 1))
	held := randomName("held-")
	htx, rec, err := holder.Begin(t.Context(), idempotency.StorageKey("", held))
	require.NoError(t, err)
	require.Nil(t, rec)
	t.Cleanup(func() { _ = htx.Rollback(context.Background()) })

	// Warm up: the first use of each statement on a connection prepares it.
	warm := randomName("warm-")
	require.Equal(t, http.StatusCreated, serve(warm).Code)
	require.Equal(t, http.StatusCreated, serve(warm).Code)
	require.Equal(t, http.StatusConflict, serve(held).Code)

	key := randomName("key-")
	cases := []struct {
		name                    string
		key                     string
		status                  int
		replayed                bool
		queries, batches, trips int64
		atAnswer                int64
	}{
		// The handler's INSERT; the two batches.
		{"First", key, http.StatusCreated, false, 1, 2, 3, 3},
		// The batch, then the ROLLBACK after the answer.
		{"Replay", key, http.StatusCreated, true, 1, 1, 2, 1},
		{"Conflict", held, http.StatusConflict, false, 1, 1, 2, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			q, b, n := tracer.queries.Load(), tracer.batches.Load(), trips.n.Load()
			w := serve(c.key)
			assert.Equal(t, c.status, w.Code)
			assert.Equal(t, c.replayed, w.Header().Get(idempotency.ReplayedHeader) == "true")
			assert.Equal(t, c.queries, tracer.queries.Load()-q, "statements sent alone")
			assert.Equal(t, c.batches, tracer.batches.Load()-b, "batches")
			assert.Equal(t, c.trips, trips.n.Load()-n, "network round trips")
			assert.Equal(t, c.atAnswer, w.at-n, "network round trips before the answer")
		})
	}
	assert.Equal(t, 1, e.orderCount(t, key))
}

// TestTxRollsBack proves that a 5xx answer and a panic roll the request's
// transaction back: no order row, no record, the 5xx delivered as written
// and the panic propagated untouched to a recovering wrapper outside the
// middleware; the retry with the same key runs afresh and commits.
func TestTxRollsBack(t *testing.T) {
	e := newTxEnv(t)
	pool := e.pool(t, 2)

	t.Run("5xx", func(t *testing.T) {
		var runs atomic.Int64
		srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, _ := io.ReadAll(r.Body)
			id, err := e.insertOrder(r, 10, string(body))
			if err != nil || runs.Add(1) == 1 {
				w.Header().Set("Content-Type", "text/plain")
				w.WriteHeader(http.StatusBadGateway)
				_, _ = io.WriteString(w, "upstream failed")
				return
			}
			writeOrder(w, id, string(body))
		}))
		key := randomName("5xx-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, http.StatusBadGateway, res.status)
		assert.Equal(t, "upstream failed", res.body)
		assert.Zero(t, e.orderCount(t, key), "the order row was rolled back")
		assert.Nil(t, e.record(t, key), "nothing was stored")

		res = mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, http.StatusCreated, res.status)
		assert.False(t, res.replayed())
		assert.Equal(t, int64(2), runs.Load(), "the retry ran afresh")
		assert.Equal(t, 1, e.orderCount(t, key))
		assert.NotNil(t, e.record(t, key))
	})

	t.Run("Panic", func(t *testing.T) {
		var runs atomic.Int64
		var recovered atomic.Value
		mw := idempotency.New(idempotency.Config{Store: e.store(pool)})(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, _ := io.ReadAll(r.Body)
			id, err := e.insertOrder(r, 10, string(body))
			if runs.Add(1) == 1 {
				panic("handler failed after its insert")
			}
			assert.NoError(t, err)
			writeOrder(w, id, string(body))
		}))
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			defer func() {
				if v := recover(); v != nil {
					recovered.Store(v)
					w.WriteHeader(http.StatusInternalServerError)
				}
			}()
			mw.ServeHTTP(w, r)
		}))
		t.Cleanup(srv.Close)

		key := randomName("panic-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, http.StatusInternalServerError, res.status)
		assert.Equal(t, "handler failed after its insert", recovered.Load(), "the panic reached the wrapper untouched")
		assert.Zero(t, e.orderCount(t, key), "the order row was rolled back")
		assert.Nil(t, e.record(t, key), "nothing was stored")

		res = mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, http.StatusCreated, res.status)
		assert.False(t, res.replayed())
		assert.Equal(t, int64(2), runs.Load(), "the retry ran afresh")
		assert.Equal(t, 1, e.orderCount(t, key))
	})
}

// TestTxAbortedTransaction proves what happens when a statement of the
// request's transaction fails and the handler catches the error and goes
// on: answering 201 gets 500 with the not-committed problem, a 4xx is
// delivered as written; in both cases nothing is stored, the order row
// written before the failure is gone, and the retry runs afresh.
func TestTxAbortedTransaction(t *testing.T) {
	e := newTxEnv(t)
	pool := e.pool(t, 2)
	failures := []struct {
		name string
		fail func(r *http.Request) error
		code string
	}{
		{"SyntaxError", func(r *http.Request) error {
			_, err := postgres.Tx(r.Context()).Exec(r.Context(), "SELEC 1")
			return err
		}, "42601"},
		{"CheckViolation", func(r *http.Request) error {
			_, err := e.insertOrder(r, -1, "negative")
			return err
		}, "23514"},
	}
	answers := []struct {
		name   string
		status int
	}{
		{"201", http.StatusCreated},
		{"4xx", http.StatusConflict},
	}
	for _, f := range failures {
		for _, a := range answers {
			t.Run(f.name+"/"+a.name, func(t *testing.T) {
				var runs atomic.Int64
				var caught atomic.Value
				srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					body, _ := io.ReadAll(r.Body)
					runs.Add(1)
					id, err := e.insertOrder(r, 10, string(body))
					if err != nil {
						w.WriteHeader(http.StatusTeapot)
						return
					}
					var pgErr *pgconn.PgError
					if errors.As(f.fail(r), &pgErr) {
						caught.Store(pgErr.Code)
					}
					if a.status == http.StatusCreated {
						writeOrder(w, id, string(body))
						return
					}
					w.Header().Set("Content-Type", "text/plain")
					w.WriteHeader(a.status)
					_, _ = io.WriteString(w, "order rejected")
				}))
				key := randomName("aborted-")
				res := mustSend(t, srv, "/orders", key, "{}")
				assert.Equal(t, f.code, caught.Load(), "the statement failed as planned")
				if a.status == http.StatusCreated {
					assertProblem(t, res, http.StatusInternalServerError, idempotency.ProblemNotCommitted)
				} else {
					assert.Equal(t, a.status, res.status)
					assert.Equal(t, "order rejected", res.body, "the 4xx is delivered as written")
					assert.False(t, res.replayed())
				}
				assert.Zero(t, e.orderCount(t, key), "the order row was rolled back")
				assert.Nil(t, e.record(t, key), "nothing was stored")

				mustSend(t, srv, "/orders", key, "{}")
				assert.Equal(t, int64(2), runs.Load(), "the retry ran afresh")
				assert.Nil(t, e.record(t, key))
			})
		}
	}
}

// TestTxHandlerTransaction proves what the handler may do with the
// transaction of postgres.Tx: Commit and Rollback return ErrManagedTx and
// end nothing; Begin gives a savepoint that the handler can roll back (its
// writes go, the outer ones stay), release (its writes stay), or use to
// catch a failed statement and go on; the outer work then commits with the
// record.
func TestTxHandlerTransaction(t *testing.T) {
	e := newTxEnv(t)
	var runs atomic.Int64
	var errs sync.Map // step -> error
	step := func(name string, err error) { errs.Store(name, fmt.Sprint(err)) }
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		ctx := r.Context()
		tx := postgres.Tx(ctx)
		key, _ := idempotency.KeyFromContext(ctx)
		step("commit", tx.Commit(ctx))
		step("rollback", tx.Rollback(ctx))
		id, err := e.insertOrder(r, 10, "outer")
		step("outer", err)

		sp, err := tx.Begin(ctx)
		step("savepoint rolled back", err)
		_, err = sp.Exec(ctx, "INSERT INTO "+e.orders+" (key, amount) VALUES ($1, 20)", key)
		step("insert in the rolled back savepoint", err)
		step("rollback of the savepoint", sp.Rollback(ctx))

		sp, err = tx.Begin(ctx)
		step("savepoint released", err)
		_, err = sp.Exec(ctx, "INSERT INTO "+e.orders+" (key, amount) VALUES ($1, 30)", key)
		step("insert in the released savepoint", err)
		step("release of the savepoint", sp.Commit(ctx))

		sp, err = tx.Begin(ctx)
		step("savepoint of a failed statement", err)
		_, err = sp.Exec(ctx, "SELEC 1")
		step("failed statement", err)
		step("rollback after the failure", sp.Rollback(ctx))
		writeOrder(w, id, "")
	}))

	key := randomName("savepoint-")
	res := mustSend(t, srv, "/orders", key, "{}")
	assert.Equal(t, http.StatusCreated, res.status, res.body)
	want := map[string]string{
		"commit":                              postgres.ErrManagedTx.Error(),
		"rollback":                            postgres.ErrManagedTx.Error(),
		"outer":                               "<nil>",
		"savepoint rolled back":               "<nil>",
		"insert in the rolled back savepoint": "<nil>",
		"rollback of the savepoint":           "<nil>",
		"savepoint released":                  "<nil>",
		"insert in the released savepoint":    "<nil>",
		"release of the savepoint":            "<nil>",
		"savepoint of a failed statement":     "<nil>",
		"rollback after the failure":          "<nil>",
	}
	for name, err := range want {
		got, _ := errs.Load(name)
		assert.Equal(t, err, got, name)
	}
	failed, _ := errs.Load("failed statement")
	assert.Contains(t, failed, "42601", "the statement in the savepoint failed")
	assert.Equal(t, []int{10, 30}, e.orderAmounts(t, key), "the outer and the released writes committed, the rolled back one did not")
	assert.NotNil(t, e.record(t, key))
	assert.Equal(t, int64(1), runs.Load())
}

// TestTxErrManagedTx proves that the errors of the handler's Commit and
// Rollback are ErrManagedTx for errors.Is, and that after them the
// transaction is still open and commits.
func TestTxErrManagedTx(t *testing.T) {
	e := newTxEnv(t)
	var commitErr, rollbackErr atomic.Value
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tx := postgres.Tx(r.Context())
		id, _ := e.insertOrder(r, 10, "")
		commitErr.Store(tx.Commit(r.Context()))
		rollbackErr.Store(tx.Rollback(r.Context()))
		writeOrder(w, id, "")
	}))
	key := randomName("managed-")
	res := mustSend(t, srv, "/orders", key, "{}")
	assert.Equal(t, http.StatusCreated, res.status)
	assert.ErrorIs(t, commitErr.Load().(error), postgres.ErrManagedTx)
	assert.ErrorIs(t, rollbackErr.Load().(error), postgres.ErrManagedTx)
	assert.Equal(t, 1, e.orderCount(t, key), "the insert before the handler's Commit and Rollback committed once")
}

// TestTxOutsideTheMode proves that postgres.Tx is nil wherever there is no
// transaction of the mode: outside a request, under a lease-mode store, for
// a method the middleware does not cover, for a request without a key, and
// in an instance nested inside another instance's claim.
func TestTxOutsideTheMode(t *testing.T) {
	assert.Nil(t, postgres.Tx(context.Background()))

	e := newTxEnv(t)
	pool := e.pool(t, 2)
	var sawTx atomic.Int64
	var saw atomic.Int64
	probe := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		saw.Add(1)
		if postgres.Tx(r.Context()) != nil {
			sawTx.Add(1)
		}
		w.WriteHeader(http.StatusCreated)
	})
	lease := serveTx(t, idempotency.Config{Store: e.leaseStore(pool)}, probe)
	txSrv := serveTx(t, idempotency.Config{Store: e.store(pool)}, probe)
	nested := httptest.NewServer(idempotency.New(idempotency.Config{Store: e.leaseStore(pool)})(
		idempotency.New(idempotency.Config{Store: e.store(pool)})(probe)))
	t.Cleanup(nested.Close)

	cases := []struct {
		name   string
		srv    *httptest.Server
		method string
		key    string
	}{
		{"LeaseStore", lease, http.MethodPost, randomName("lease-")},
		{"NotCovered", txSrv, http.MethodGet, randomName("get-")},
		{"NoKey", txSrv, http.MethodPost, ""},
		{"Nested", nested, http.MethodPost, randomName("nested-")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := saw.Load()
			req, err := http.NewRequestWithContext(t.Context(), c.method, c.srv.URL+"/orders", nil)
			require.NoError(t, err)
			if c.key != "" {
				req.Header.Set("Idempotency-Key", c.key)
			}
			resp, err := c.srv.Client().Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			assert.Equal(t, http.StatusCreated, resp.StatusCode)
			assert.Equal(t, before+1, saw.Load(), "the handler ran")
		})
	}
	assert.Zero(t, sawTx.Load(), "no handler saw a transaction")

	// The control: the same handler in the mode sees one.
	res := mustSend(t, txSrv, "/orders", randomName("control-"), "{}")
	assert.Equal(t, http.StatusCreated, res.status)
	assert.Equal(t, int64(1), sawTx.Load())
}

// TestTxStoreOptions proves the construction-time checks of the mode,
// without a database: NewStore panics on a non-positive
// WithMaxTxDuration, Begin on a store built without Transactional returns
// an error, and New panics on FailOpen with a
// transactional store.
func TestTxStoreOptions(t *testing.T) {
	pool := outagePool(t, "127.0.0.1:1")
	for _, d := range []time.Duration{0, -time.Second} {
		assert.PanicsWithValue(t, fmt.Sprintf("postgres: WithMaxTxDuration(%v): the duration must be positive", d), func() {
			postgres.NewStore(pool, postgres.Transactional(), postgres.WithMaxTxDuration(d))
		})
	}
	assert.NotPanics(t, func() { postgres.NewStore(pool, postgres.WithMaxTxDuration(time.Nanosecond)) })

	lease := postgres.NewStore(pool)
	assert.False(t, lease.Transactional())
	tx, rec, err := lease.Begin(t.Context(), idempotency.StorageKey("", "k"))
	assert.Error(t, err)
	assert.Nil(t, tx)
	assert.Nil(t, rec)
	assert.True(t, postgres.NewStore(pool, postgres.Transactional()).Transactional())

	assert.Panics(t, func() {
		idempotency.New(idempotency.Config{Store: postgres.NewStore(pool, postgres.Transactional()), FailOpen: true})
	})
}

// slowOrders is an order handler whose requests to /slow insert their
// order, signal entered and wait for release before answering.
type slowOrders struct {
	e       *txEnv
	runs    atomic.Int64
	entered chan string // the key of each request that reached the wait
	release chan struct{}
}

func newSlowOrders(e *txEnv) *slowOrders {
	return &slowOrders{e: e, entered: make(chan string, 16), release: make(chan struct{})}
}

func (h *slowOrders) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	h.runs.Add(1)
	id, err := h.e.insertOrder(r, 10, string(body))
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	if r.URL.Path == "/slow" {
		key, _ := idempotency.KeyFromContext(r.Context())
		h.entered <- key
		<-h.release
	}
	writeOrder(w, id, string(body))
}

// TestTxBusyKey proves what a second request with a key whose transaction
// is open gets: 409 with the in-progress problem and Retry-After by
// default, then the replay once the first committed; with
// Config.WaitForInFlight it waits and gets the replay, and holds no pooled
// connection while it waits: its pool of one connection serves another
// request meanwhile, and shows no connection acquired between polls.
func TestTxBusyKey(t *testing.T) {
	e := newTxEnv(t)

	t.Run("Conflict", func(t *testing.T) {
		h := newSlowOrders(e)
		srvA := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, h)
		srvB := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, h)
		key := randomName("busy-")
		first := sendAsync(srvA, "/slow", key, "{}")
		<-h.entered

		res := mustSend(t, srvB, "/slow", key, "{}")
		assertProblem(t, res, http.StatusConflict, idempotency.ProblemInProgress)
		assert.Zero(t, e.orderCount(t, key), "the first request's order is not committed yet")
		close(h.release)

		firstRes := receive(t, first)
		assert.Equal(t, http.StatusCreated, firstRes.status)
		retry := mustSend(t, srvB, "/slow", key, "{}")
		assert.Equal(t, http.StatusCreated, retry.status)
		assert.True(t, retry.replayed())
		assert.Equal(t, firstRes.body, retry.body)
		assert.Equal(t, int64(1), h.runs.Load())
		assert.Equal(t, 1, e.orderCount(t, key))
	})

	t.Run("Wait", func(t *testing.T) {
		h := newSlowOrders(e)
		srvA := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, h)
		poolB := e.pool(t, 1)
		srvB := serveTx(t, idempotency.Config{
			Store:           e.store(poolB),
			WaitForInFlight: 10 * time.Second,
			StoreTimeout:    time.Second,
		}, h)
		key := randomName("wait-")
		first := sendAsync(srvA, "/slow", key, "{}")
		<-h.entered

		acquires := poolB.Stat().AcquireCount()
		waiter := sendAsync(srvB, "/slow", key, "{}")
		waitFor(t, "the waiter to poll three times with no connection held in between", func() bool {
			s := poolB.Stat()
			return s.AcquireCount() >= acquires+3 && s.AcquiredConns() == 0
		})
		// The waiter's pool has one connection: were it held, this request
		// would wait StoreTimeout for it and get 503.
		other := randomName("other-")
		res := mustSend(t, srvB, "/orders", other, "{}")
		assert.Equal(t, http.StatusCreated, res.status, res.body)
		assert.Equal(t, 1, e.orderCount(t, other))
		select {
		case res := <-waiter:
			t.Fatalf("the waiter answered before the first request committed: %d %s", res.status, res.body)
		default:
		}

		close(h.release)
		firstRes := receive(t, first)
		assert.Equal(t, http.StatusCreated, firstRes.status)
		waited := receive(t, waiter)
		assert.Equal(t, http.StatusCreated, waited.status, waited.body)
		assert.True(t, waited.replayed())
		assert.Equal(t, firstRes.body, waited.body)
		assert.Equal(t, int64(2), h.runs.Load(), "the first request and the other key ran; the waiter did not")
		assert.Equal(t, 1, e.orderCount(t, key))
	})
}

// TestTxConcurrentOneKey proves exactly once across processes: 200
// concurrent requests with one key on three instances, each with its own
// pool of 5 connections, make exactly one order row; every client gets
// either the one 201 body (first execution or replay) or 409, and the
// retry of each 409 gets the replay of that body.
func TestTxConcurrentOneKey(t *testing.T) {
	e := newTxEnv(t)
	var runs atomic.Int64
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		runs.Add(1)
		id, err := e.insertOrder(r, 10, string(body))
		if err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		time.Sleep(50 * time.Millisecond) // hold the key while others arrive
		writeOrder(w, id, string(body))
	})
	srvs := make([]*httptest.Server, 3)
	for i := range srvs {
		srvs[i] = serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 5)), StoreTimeout: 10 * time.Second}, handler)
	}

	const requests = 200
	key := randomName("concurrent-")
	results := make([]txResult, requests)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() {
			<-start
			results[i] = send(context.Background(), srvs[i%len(srvs)], "/orders", key, `{"amount":10}`)
		})
	}
	close(start)
	wg.Wait()

	assert.Equal(t, int64(1), runs.Load(), "the handler ran once")
	assert.Equal(t, 1, e.orderCount(t, key), "one order row")
	var body string
	executed, conflicts := 0, 0
	for _, res := range results {
		require.NoError(t, res.err)
		switch res.status {
		case http.StatusCreated:
			if !res.replayed() {
				executed++
			}
			if body == "" {
				body = res.body
			}
			assert.Equal(t, body, res.body)
		case http.StatusConflict:
			conflicts++
			assert.True(t, strings.HasSuffix(problemType(t, res.body), "#"+idempotency.ProblemInProgress))
		default:
			t.Errorf("unexpected answer %d: %s", res.status, res.body)
		}
	}
	assert.Equal(t, 1, executed, "one first execution")
	t.Logf("%d conflicts, %d replays", conflicts, requests-executed-conflicts)
	for i, res := range results {
		if res.status != http.StatusConflict {
			continue
		}
		retry := mustSend(t, srvs[i%len(srvs)], "/orders", key, `{"amount":10}`)
		assert.Equal(t, http.StatusCreated, retry.status)
		assert.True(t, retry.replayed())
		assert.Equal(t, body, retry.body)
	}
	assert.Equal(t, int64(1), runs.Load())
	assert.Equal(t, 1, e.orderCount(t, key))
}

// TestTxPoolExhausted proves that when every connection of the pool is
// held by a slow handler, a new request is answered 503 with Retry-After
// within StoreTimeout, with nothing run and nothing stored, that the
// observer is told the pool was exhausted, and that its retry runs once
// connections are free.
func TestTxPoolExhausted(t *testing.T) {
	const storeTimeout = 200 * time.Millisecond
	e := newTxEnv(t)
	h := newSlowOrders(e)
	var storeErr atomic.Value // the observer's error for the exhausted pool
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2)), StoreTimeout: storeTimeout, Observer: func(ev idempotency.Event) {
		if ev.Outcome == idempotency.OutcomeStoreError {
			storeErr.Store(ev.Err)
		}
	}}, h)
	slow := []<-chan txResult{
		sendAsync(srv, "/slow", randomName("slow-"), "{}"),
		sendAsync(srv, "/slow", randomName("slow-"), "{}"),
	}
	<-h.entered
	<-h.entered

	key := randomName("third-")
	start := time.Now()
	res := mustSend(t, srv, "/orders", key, "{}")
	elapsed := time.Since(start)
	assertProblem(t, res, http.StatusServiceUnavailable, idempotency.ProblemStoreUnavailable)
	assert.GreaterOrEqual(t, elapsed, storeTimeout, "it waited for a connection")
	assert.Less(t, elapsed, 2*time.Second, "bounded by StoreTimeout")
	assert.Equal(t, int64(2), h.runs.Load(), "the handler did not run")
	assert.Nil(t, e.record(t, key))
	err, _ := storeErr.Load().(error)
	require.Error(t, err, "the observer heard of it")
	assert.Contains(t, err.Error(), "pool exhausted", "the observer is told why")
	assert.ErrorIs(t, err, context.DeadlineExceeded)

	close(h.release)
	for _, ch := range slow {
		assert.Equal(t, http.StatusCreated, receive(t, ch).status)
	}
	res = mustSend(t, srv, "/orders", key, "{}")
	assert.Equal(t, http.StatusCreated, res.status)
	assert.False(t, res.replayed())
	assert.Equal(t, 1, e.orderCount(t, key))
}

// TestTxResponseWriter proves how the response writer behaves in the mode,
// where the response is held until the commit: a response over
// MaxResponseSize rolls back and is answered 500 (and its retry runs
// afresh); Flush succeeds and sends nothing (a 201 flushed before a failed
// statement still becomes a 500); Hijack reports http.ErrNotSupported and
// the request still commits.
func TestTxResponseWriter(t *testing.T) {
	e := newTxEnv(t)
	pool := e.pool(t, 2)

	t.Run("OverMaxResponseSize", func(t *testing.T) {
		var runs atomic.Int64
		var flushErr atomic.Value
		srv := serveTx(t, idempotency.Config{Store: e.store(pool), MaxResponseSize: 1024}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			runs.Add(1)
			_, _ = e.insertOrder(r, 10, "")
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write(make([]byte, 100))
			flushErr.Store(fmt.Sprint(http.NewResponseController(w).Flush()))
			_, _ = w.Write(make([]byte, 2000))
		}))
		key := randomName("large-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assertProblem(t, res, http.StatusInternalServerError, idempotency.ProblemNotCommitted)
		assert.Equal(t, "<nil>", flushErr.Load())
		assert.Zero(t, e.orderCount(t, key), "rolled back")
		assert.Nil(t, e.record(t, key), "nothing stored")

		res = mustSend(t, srv, "/orders", key, "{}")
		assertProblem(t, res, http.StatusInternalServerError, idempotency.ProblemNotCommitted)
		assert.Equal(t, int64(2), runs.Load(), "the retry ran afresh")
		assert.Zero(t, e.orderCount(t, key))
	})

	t.Run("FlushSendsNothing", func(t *testing.T) {
		var flushErr atomic.Value
		srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			id, _ := e.insertOrder(r, 10, "")
			writeOrder(w, id, "")
			flushErr.Store(fmt.Sprint(http.NewResponseController(w).Flush()))
			_, _ = postgres.Tx(r.Context()).Exec(r.Context(), "SELEC 1")
		}))
		key := randomName("flush-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, "<nil>", flushErr.Load())
		assertProblem(t, res, http.StatusInternalServerError, idempotency.ProblemNotCommitted)
		assert.Zero(t, e.orderCount(t, key))
	})

	t.Run("Incomplete", func(t *testing.T) {
		srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = e.insertOrder(r, 10, "")
			w.Header().Set("Content-Length", "100")
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write(make([]byte, 10))
		}))
		key := randomName("short-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assertProblem(t, res, http.StatusInternalServerError, idempotency.ProblemNotCommitted)
		assert.Zero(t, e.orderCount(t, key), "rolled back")
		assert.Nil(t, e.record(t, key), "nothing stored")
	})

	t.Run("Hijack", func(t *testing.T) {
		var hijackErr atomic.Value
		srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if conn != nil {
				_ = conn.Close()
			}
			hijackErr.Store(fmt.Sprint(errors.Is(err, http.ErrNotSupported)))
			id, _ := e.insertOrder(r, 10, "")
			writeOrder(w, id, "")
		}))
		key := randomName("hijack-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, "true", hijackErr.Load(), "Hijack reports http.ErrNotSupported")
		assert.Equal(t, http.StatusCreated, res.status)
		assert.Equal(t, 1, e.orderCount(t, key))
	})
}

// TestTxMaxDuration proves WithMaxTxDuration: the handler's context ends at
// the transaction's deadline, and a handler that returns after it has its
// transaction rolled back and gets 503 with the not-committed problem: no
// order row, no record.
func TestTxMaxDuration(t *testing.T) {
	const maxTx = 300 * time.Millisecond
	e := newTxEnv(t)
	var ctxErr atomic.Value
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2), postgres.WithMaxTxDuration(maxTx))},
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			id, _ := e.insertOrder(r, 10, "")
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
			ctxErr.Store(fmt.Sprint(r.Context().Err()))
			writeOrder(w, id, "")
		}))
	key := randomName("overdue-")
	start := time.Now()
	res := mustSend(t, srv, "/orders", key, "{}")
	assertProblem(t, res, http.StatusServiceUnavailable, idempotency.ProblemNotCommitted)
	assert.Equal(t, context.DeadlineExceeded.Error(), ctxErr.Load())
	assert.GreaterOrEqual(t, time.Since(start), maxTx)
	assert.Zero(t, e.orderCount(t, key), "rolled back")
	assert.Nil(t, e.record(t, key), "nothing stored")
}

// TestTxClientHangsUp proves that a client hanging up does not cancel the
// handler's context in the mode: the handler, which goes on after the
// server noticed the disconnect, still writes and commits, and the retry
// gets the replay.
func TestTxClientHangsUp(t *testing.T) {
	e := newTxEnv(t)
	var runs atomic.Int64
	entered := make(chan struct{}, 1)
	var handlerCtxErr atomic.Value
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		runs.Add(1)
		entered <- struct{}{}
		select {
		case <-serverCtxOf(r).Done(): // the server noticed the client has gone
		case <-time.After(5 * time.Second):
		}
		handlerCtxErr.Store(fmt.Sprint(r.Context().Err()))
		id, err := e.insertOrder(r, 10, string(body))
		if err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		writeOrder(w, id, string(body))
	})
	served := make(chan struct{}, 1)
	mw := idempotency.New(idempotency.Config{Store: e.store(e.pool(t, 2))})(handler)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() { served <- struct{}{} }()
		mw.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), serverCtxKey{}, r.Context())))
	}))
	t.Cleanup(srv.Close)

	key := randomName("hangup-")
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan txResult, 1)
	go func() { done <- send(ctx, srv, "/orders", key, "{}") }()
	<-entered
	cancel()
	assert.Error(t, receiveAny(t, done).err, "the client gave up")
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		t.Fatal("the request did not finish")
	}
	assert.Equal(t, "<nil>", handlerCtxErr.Load(), "the handler's context outlived the client")
	assert.Equal(t, 1, e.orderCount(t, key), "committed")

	res := mustSend(t, srv, "/orders", key, "{}")
	assert.Equal(t, http.StatusCreated, res.status)
	assert.True(t, res.replayed())
	assert.Equal(t, int64(1), runs.Load())
}

// serverCtxKey carries the request's context as the server made it, before
// the middleware, so a handler can see the client hang up.
type serverCtxKey struct{}

func serverCtxOf(r *http.Request) context.Context {
	ctx, _ := r.Context().Value(serverCtxKey{}).(context.Context)
	if ctx == nil {
		return r.Context()
	}
	return ctx
}

// receiveAny is receive for a result whose transport error is expected.
func receiveAny(t *testing.T, ch <-chan txResult) txResult {
	t.Helper()
	select {
	case res := <-ch:
		return res
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for a response")
		return txResult{}
	}
}

// completeElsewhere claims and completes key through a lease-mode store on
// e's table, as another request would, with a 201 whose body is body and
// the fingerprint fp.
func (e *txEnv) completeElsewhere(t *testing.T, key, body string, fp []byte) {
	t.Helper()
	lease := e.leaseStore(e.admin)
	skey := idempotency.StorageKey("", key)
	rec, err := lease.Claim(t.Context(), skey, "another-request", time.Minute)
	require.NoError(t, err)
	require.Nil(t, rec, "claimed")
	require.NoError(t, lease.Complete(t.Context(), skey, "another-request", &idempotency.Record{
		State:       idempotency.StateCompleted,
		Fingerprint: fp,
		Response: idempotency.Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Content-Type": {"application/json"}, "Location": {"/orders/elsewhere"}},
			Body:       []byte(body),
		},
	}, time.Hour))
}

// TestTxLiveRecordAtCommit proves what happens when the record insert at
// commit finds a live record, because another request completed the key
// after Begin looked: through the store API, Commit returns that record
// and nothing of the transaction is committed; over HTTP, the request is
// answered with the replay of that record, or 422 when its fingerprint
// differs, and its order row is gone.
func TestTxLiveRecordAtCommit(t *testing.T) {
	e := newTxEnv(t)
	pool := e.pool(t, 2)

	t.Run("Store", func(t *testing.T) {
		store := e.store(pool)
		key := randomName("live-")
		skey := idempotency.StorageKey("", key)
		tx, rec, err := store.Begin(t.Context(), skey)
		require.NoError(t, err)
		require.Nil(t, rec)
		ctx := tx.Context(t.Context())
		_, err = postgres.Tx(ctx).Exec(ctx, "INSERT INTO "+e.orders+" (key, amount) VALUES ($1, 10)", key)
		require.NoError(t, err)

		e.completeElsewhere(t, key, "theirs", nil)
		live, err := tx.Commit(t.Context(), &idempotency.Record{
			State:    idempotency.StateCompleted,
			Response: idempotency.Response{StatusCode: http.StatusCreated, Body: []byte("mine")},
		}, time.Hour)
		require.NoError(t, err)
		require.NotNil(t, live, "Commit returned the live record")
		assert.Equal(t, idempotency.StateCompleted, live.State)
		assert.Equal(t, "theirs", string(live.Response.Body))
		assert.Equal(t, "/orders/elsewhere", live.Response.Header.Get("Location"))
		assert.NoError(t, tx.Rollback(t.Context()), "Rollback after Commit is safe")
		assert.Zero(t, e.orderCount(t, key), "nothing of the transaction committed")
		assert.Equal(t, "theirs", string(e.record(t, key).Response.Body))
	})

	cases := []struct {
		name        string
		fingerprint []byte
		status      int
	}{
		{"HTTPReplay", nil, http.StatusCreated},
		{"HTTPMismatch", []byte("another request"), http.StatusUnprocessableEntity},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newSlowOrders(e)
			srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, h)
			key := randomName("live-")
			first := sendAsync(srv, "/slow", key, "{}")
			<-h.entered
			e.completeElsewhere(t, key, `{"order":"elsewhere"}`, c.fingerprint)
			close(h.release)
			res := receive(t, first)
			if c.status == http.StatusCreated {
				assert.Equal(t, http.StatusCreated, res.status, res.body)
				assert.True(t, res.replayed())
				assert.Equal(t, `{"order":"elsewhere"}`, res.body)
				assert.Equal(t, "/orders/elsewhere", res.header.Get("Location"))
			} else {
				assertProblem(t, res, c.status, idempotency.ProblemKeyReused)
			}
			assert.Zero(t, e.orderCount(t, key), "the request's order row was rolled back")
			assert.Equal(t, `{"order":"elsewhere"}`, string(e.record(t, key).Response.Body))
		})
	}
}

// TestTxExpiredRow proves that an expired row under a key does not stand in
// the way of the one-transaction mode: a completed record past its TTL, a
// claim whose lease ran out (its process died), and a claim that another
// store makes after Begin looked and whose lease runs out before the
// commit are all taken over at the commit: the handler runs once, its
// order row and its record commit, and a retry replays.
func TestTxExpiredRow(t *testing.T) {
	e := newTxEnv(t)
	var runs atomic.Int64
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, e.ordersHandler(&runs))
	lease := e.leaseStore(e.admin)

	t.Run("Completed", func(t *testing.T) {
		key := randomName("expired-")
		skey := idempotency.StorageKey("", key)
		rec, err := lease.Claim(t.Context(), skey, "old", time.Minute)
		require.NoError(t, err)
		require.Nil(t, rec)
		require.NoError(t, lease.Complete(t.Context(), skey, "old", &idempotency.Record{
			State:    idempotency.StateCompleted,
			Response: idempotency.Response{StatusCode: http.StatusCreated, Body: []byte("old")},
		}, time.Millisecond))
		time.Sleep(20 * time.Millisecond)

		before := runs.Load()
		res := mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, http.StatusCreated, res.status, res.body)
		assert.False(t, res.replayed())
		assert.Equal(t, before+1, runs.Load())
		assert.Equal(t, 1, e.orderCount(t, key))
		assert.Equal(t, res.body, string(e.record(t, key).Response.Body), "the new record replaced the expired one")
	})

	t.Run("LeaseRanOut", func(t *testing.T) {
		key := randomName("expired-")
		rec, err := lease.Claim(t.Context(), idempotency.StorageKey("", key), "dead", time.Millisecond)
		require.NoError(t, err)
		require.Nil(t, rec)
		time.Sleep(20 * time.Millisecond)

		res := mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, http.StatusCreated, res.status, res.body)
		assert.Equal(t, 1, e.orderCount(t, key))
		replay := mustSend(t, srv, "/orders", key, "{}")
		assert.True(t, replay.replayed())
		assert.Equal(t, res.body, replay.body)
	})

	t.Run("ExpiresAfterBegin", func(t *testing.T) {
		claimed := false
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			key, _ := idempotency.KeyFromContext(r.Context())
			id, err := e.insertOrder(r, 10, "{}")
			if err != nil {
				w.WriteHeader(http.StatusInternalServerError)
				return
			}
			if !claimed {
				// Another store claims the key outside this transaction;
				// its lease runs out before this request commits.
				claimed = true
				rec, err := lease.Claim(r.Context(), idempotency.StorageKey("", key), "other", 10*time.Millisecond)
				if err != nil || rec != nil {
					w.WriteHeader(http.StatusInternalServerError)
					return
				}
				time.Sleep(30 * time.Millisecond)
			}
			writeOrder(w, id, "{}")
		})
		srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, h)
		key := randomName("expired-")

		first := mustSend(t, srv, "/orders", key, "{}")
		assert.Equal(t, http.StatusCreated, first.status, first.body)
		assert.True(t, claimed)
		assert.Equal(t, 1, e.orderCount(t, key))
		assert.Equal(t, first.body, string(e.record(t, key).Response.Body))

		retry := mustSend(t, srv, "/orders", key, "{}")
		assert.True(t, retry.replayed())
		assert.Equal(t, first.body, retry.body)
		assert.Equal(t, 1, e.orderCount(t, key))
	})
}

// TestTxSerializationFailure proves the answer to a serialisation failure
// under SERIALIZABLE: two requests with different keys each read the
// account's orders and add one (write skew); the first commits, the second
// one's commit fails with 40001 and is answered 503 with Retry-After and
// the not-committed problem, with nothing of it committed; its retry runs
// afresh. Should PostgreSQL report the failure at the handler's statement
// instead (it does not in this schedule: the first commit dooms the
// second), the SPEC's rule for 40001 applies all the same: 503 with
// Retry-After (see TestTxDeadlockAtStatement for the same rule at a
// statement, which the implementation does not follow).
func TestTxSerializationFailure(t *testing.T) {
	e := newTxEnv(t)
	var reads, writes sync.WaitGroup
	reads.Add(2)
	writes.Add(2)
	secondGoes := make(chan struct{})
	var stmtErr sync.Map // key -> SQLSTATE of a failed statement
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		tx := postgres.Tx(ctx)
		key, _ := idempotency.KeyFromContext(ctx)
		role := r.Header.Get("X-Role")
		var total int
		err := tx.QueryRow(ctx, "SELECT coalesce(sum(amount), 0) FROM "+e.orders+" WHERE account = 'shared'").Scan(&total)
		if role != "" { // both have read before either writes
			reads.Done()
			reads.Wait()
		}
		if err == nil {
			_, err = tx.Exec(ctx, "INSERT INTO "+e.orders+" (key, account, amount) VALUES ($1, 'shared', $2)", key, total+10)
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			stmtErr.Store(key, pgErr.Code)
		}
		if role != "" { // both have written before either commits
			writes.Done()
			writes.Wait()
		}
		if role == "second" { // the second commits after the first did
			<-secondGoes
		}
		writeOrder(w, 0, "")
	})
	var notCommitted sync.Map // storage key -> SQLSTATE behind OutcomeNotCommitted
	srv := serveTx(t, idempotency.Config{
		Store: e.store(e.pool(t, 3), postgres.WithTxOptions(pgx.TxOptions{IsoLevel: pgx.Serializable})),
		Observer: func(ev idempotency.Event) {
			var pgErr *pgconn.PgError
			if ev.Outcome == idempotency.OutcomeNotCommitted && errors.As(ev.Err, &pgErr) {
				notCommitted.Store(ev.StorageKey, pgErr.Code)
			}
		},
	}, handler)

	keyA, keyB := randomName("first-"), randomName("second-")
	doneA := sendAsync(srv, "/orders", keyA, "{}", "X-Role", "first")
	doneB := sendAsync(srv, "/orders", keyB, "{}", "X-Role", "second")
	resA := receive(t, doneA)
	close(secondGoes)
	resB := receive(t, doneB)

	_, failedA := stmtErr.Load(keyA)
	require.False(t, failedA, "the first request's statements succeeded")
	assert.Equal(t, http.StatusCreated, resA.status, resA.body)
	assert.Equal(t, 1, e.orderCount(t, keyA))
	assert.NotNil(t, e.record(t, keyA))

	if code, failed := stmtErr.Load(keyB); failed {
		t.Logf("the serialisation failure came at a statement (%v)", code)
		assert.Equal(t, "40001", code)
	} else {
		code, _ := notCommitted.Load(idempotency.StorageKey("", keyB))
		assert.Equal(t, "40001", code, "the commit failed with a serialisation failure")
	}
	assertProblem(t, resB, http.StatusServiceUnavailable, idempotency.ProblemNotCommitted)
	assert.Zero(t, e.orderCount(t, keyB), "nothing of the second request committed")
	assert.Nil(t, e.record(t, keyB))

	// The retry runs alone, so it commits.
	res := mustSend(t, srv, "/orders", keyB, "{}")
	assert.Equal(t, http.StatusCreated, res.status, res.body)
	assert.False(t, res.replayed())
	assert.Equal(t, 1, e.orderCount(t, keyB))
}

// cutConn is a connection to PostgreSQL that a handler can cut: at once,
// as a crashed network would, or right after its next write, so that what
// was written reaches the server and its answer is lost.
type cutConn struct {
	net.Conn
	cutAfterWrite atomic.Bool
}

func (c *cutConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if c.cutAfterWrite.Swap(false) {
		_ = c.Conn.Close()
	}
	return n, err
}

// dialCuttable is a pgconn DialFunc that makes cutConns.
func dialCuttable(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &cutConn{Conn: conn}, nil
}

// connOf returns the cuttable connection of the request's transaction.
func connOf(r *http.Request) *cutConn {
	return postgres.Tx(r.Context()).Conn().PgConn().Conn().(*cutConn)
}

// untilNotBusy sends until the answer is not a 409: the server may take a
// moment to notice a lost connection and free its lock.
func untilNotBusy(t *testing.T, srv *httptest.Server, key string) txResult {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		res := mustSend(t, srv, "/orders", key, "{}")
		if res.status != http.StatusConflict || time.Now().After(deadline) {
			return res
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTxConnectionLost proves the two ways a request can lose its
// connection. Cut while the handler runs (a crash or a network failure
// before COMMIT): the request gets 503 not-committed, nothing of it is
// committed, and the retry, on another instance, runs afresh at once (the
// lock died with the connection; there is no lease to wait out). Cut right
// after the record insert and COMMIT were sent (the outcome is unknown to
// the middleware): 503 not-committed with Retry-After, and the retry finds
// what the server committed and replays it.
func TestTxConnectionLost(t *testing.T) {
	e := newTxEnv(t)
	cfg := poolConfig(t)
	cfg.MaxConns = 2
	cfg.ConnConfig.DialFunc = dialCuttable
	cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec // one write per batch, no preparing
	pool := newPool(t, cfg)
	var runs atomic.Int64
	handler := func(cut func(c *cutConn)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			body, _ := io.ReadAll(r.Body)
			n := runs.Add(1)
			id, err := e.insertOrder(r, 10, string(body))
			if err != nil {
				w.WriteHeader(http.StatusInternalServerError)
				return
			}
			if n == 1 {
				cut(connOf(r))
			}
			writeOrder(w, id, string(body))
		}
	}
	other := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2))}, e.ordersHandler(&runs))

	t.Run("BeforeCommit", func(t *testing.T) {
		runs.Store(0)
		srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, handler(func(c *cutConn) { _ = c.Conn.Close() }))
		key := randomName("crash-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assertProblem(t, res, http.StatusServiceUnavailable, idempotency.ProblemNotCommitted)
		assert.Zero(t, e.orderCount(t, key), "nothing committed")

		start := time.Now()
		res = untilNotBusy(t, other, key)
		assert.Equal(t, http.StatusCreated, res.status, res.body)
		assert.False(t, res.replayed(), "the retry ran afresh")
		assert.Less(t, time.Since(start), 2*time.Second, "at once: no lease to wait out")
		assert.Equal(t, int64(2), runs.Load())
		assert.Equal(t, 1, e.orderCount(t, key))
	})

	t.Run("CommitUnanswered", func(t *testing.T) {
		runs.Store(0)
		srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, handler(func(c *cutConn) { c.cutAfterWrite.Store(true) }))
		key := randomName("unknown-")
		res := mustSend(t, srv, "/orders", key, "{}")
		assertProblem(t, res, http.StatusServiceUnavailable, idempotency.ProblemNotCommitted)

		res = untilNotBusy(t, other, key)
		assert.Equal(t, http.StatusCreated, res.status, res.body)
		assert.True(t, res.replayed(), "the COMMIT had reached the server: the retry replays")
		assert.Equal(t, int64(1), runs.Load())
		assert.Equal(t, 1, e.orderCount(t, key))
	})
}

// TestTxDeadlockAtStatement proves the answer to a deadlock: "Serialisation
// failures and deadlocks (40001, 40P01) roll back and answer 503 with
// Retry-After". Two requests with different keys update two rows in
// opposite orders; PostgreSQL aborts one of them with 40P01 at its UPDATE
// (a deadlock is always reported at a statement, never at COMMIT). Its
// handler catches the error and goes on to answer 201. Expected: 503 with
// Retry-After and the not-committed problem, nothing of it committed; the
// other request commits. (Without the transaction noting the cause of the
// failure, the already-aborted rule would answer 500, which the client
// package does not retry.)
func TestTxDeadlockAtStatement(t *testing.T) {
	e := newTxEnv(t)
	_, err := e.admin.Exec(t.Context(), "INSERT INTO "+e.orders+" (key, amount) VALUES ('row-1', 1), ('row-2', 1)")
	require.NoError(t, err)
	var locked sync.WaitGroup
	locked.Add(2)
	var failed sync.Map // key -> SQLSTATE of the failed statement
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		tx := postgres.Tx(ctx)
		key, _ := idempotency.KeyFromContext(ctx)
		first, second := "row-1", "row-2"
		if r.Header.Get("X-Role") == "b" {
			first, second = second, first
		} else if sp, err := tx.Begin(ctx); err == nil {
			// Let this one detect the deadlock, where the role allows it.
			if _, err := sp.Exec(ctx, "SET LOCAL deadlock_timeout = '50ms'"); err != nil {
				_ = sp.Rollback(ctx)
			} else {
				_ = sp.Commit(ctx)
			}
		}
		_, err := e.insertOrder(r, 10, "")
		if err == nil {
			_, err = tx.Exec(ctx, "UPDATE "+e.orders+" SET amount = amount + 1 WHERE key = $1", first)
		}
		locked.Done()
		locked.Wait()
		if err == nil {
			_, err = tx.Exec(ctx, "UPDATE "+e.orders+" SET amount = amount + 1 WHERE key = $1", second)
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			failed.Store(key, pgErr.Code)
		}
		writeOrder(w, 0, "")
	})
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 3))}, handler)

	keyA, keyB := randomName("a-"), randomName("b-")
	doneA := sendAsync(srv, "/orders", keyA, "{}", "X-Role", "a")
	doneB := sendAsync(srv, "/orders", keyB, "{}", "X-Role", "b")
	results := map[string]txResult{keyA: receive(t, doneA), keyB: receive(t, doneB)}

	loser, winner := keyA, keyB
	if _, ok := failed.Load(keyB); ok {
		loser, winner = keyB, keyA
	}
	code, _ := failed.Load(loser)
	require.Equal(t, "40P01", code, "one request hit the deadlock at its UPDATE")
	_, ok := failed.Load(winner)
	require.False(t, ok)

	assert.Equal(t, http.StatusCreated, results[winner].status)
	assert.Equal(t, 1, e.orderCount(t, winner))
	assert.Zero(t, e.orderCount(t, loser), "nothing of the deadlocked request committed")
	assert.Nil(t, e.record(t, loser), "nothing stored")
	assertProblem(t, results[loser], http.StatusServiceUnavailable, idempotency.ProblemNotCommitted)
}

// TestTxMaxDurationDuringStatement proves what WithMaxTxDuration documents for a
// handler that outlives it: "a handler that returns after it has its
// transaction rolled back (503)". Here the handler is in a slow statement
// when the deadline comes: pgx cancels the statement (and drops the
// connection); the handler goes on and answers 201 after the deadline.
// Expected: 503 with Retry-After and the not-committed problem; nothing
// committed, although the transaction also looks aborted (its connection
// is closed).
func TestTxMaxDurationDuringStatement(t *testing.T) {
	const maxTx = 300 * time.Millisecond
	e := newTxEnv(t)
	var stmtErr atomic.Value
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2), postgres.WithMaxTxDuration(maxTx))},
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			id, _ := e.insertOrder(r, 10, "")
			_, err := postgres.Tx(r.Context()).Exec(r.Context(), "SELECT pg_sleep(5)")
			stmtErr.Store(fmt.Sprint(errors.Is(err, context.DeadlineExceeded)))
			writeOrder(w, id, "")
		}))
	key := randomName("slow-statement-")
	start := time.Now()
	res := mustSend(t, srv, "/orders", key, "{}")
	assert.Less(t, time.Since(start), 3*time.Second, "the statement was cut at the deadline")
	assert.Equal(t, "true", stmtErr.Load(), "the statement ended with the transaction's deadline")
	assert.Zero(t, e.orderCount(t, key), "rolled back")
	assert.Nil(t, e.record(t, key), "nothing stored")
	assertProblem(t, res, http.StatusServiceUnavailable, idempotency.ProblemNotCommitted)
}
