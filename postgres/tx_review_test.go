package postgres_test

import (
	"context"
	"net/http"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

// TestTxClosedAfterTheHandler proves that the transaction a handler kept
// is closed once the request has committed: a statement through it fails
// with pgx.ErrTxClosed instead of running on a connection the pool has
// handed out again.
func TestTxClosedAfterTheHandler(t *testing.T) {
	e := newTxEnv(t)
	pool := e.pool(t, 1)
	var kept pgx.Tx
	srv := serveTx(t, idempotency.Config{Store: e.store(pool)}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		kept = postgres.Tx(r.Context())
		id, err := e.insertOrder(r, 10, "")
		require.NoError(t, err)
		writeOrder(w, id, "")
	}))
	key := randomName("closed-")
	require.Equal(t, http.StatusCreated, mustSend(t, srv, "/orders", key, "{}").status)

	ctx := context.Background()
	_, err := kept.Exec(ctx, "INSERT INTO "+e.orders+" (key, amount) VALUES ($1, 1)", key)
	assert.ErrorIs(t, err, pgx.ErrTxClosed)
	var one int
	assert.ErrorIs(t, kept.QueryRow(ctx, "SELECT 1").Scan(&one), pgx.ErrTxClosed)
	_, err = kept.Query(ctx, "SELECT 1")
	assert.ErrorIs(t, err, pgx.ErrTxClosed)
	_, err = kept.Begin(ctx)
	assert.ErrorIs(t, err, pgx.ErrTxClosed)
	assert.ErrorIs(t, kept.SendBatch(ctx, &pgx.Batch{}).Close(), pgx.ErrTxClosed)
	assert.Equal(t, 1, e.orderCount(t, key), "nothing ran outside the transaction")
}

// TestTxUserUniqueViolationAtCommit proves that a unique violation of the
// handler's own deferred constraint, raised at COMMIT, is a rollback
// (503, nothing stored), not mistaken for another request having stored
// the key.
func TestTxUserUniqueViolationAtCommit(t *testing.T) {
	e := newTxEnv(t)
	_, err := e.admin.Exec(t.Context(), "ALTER TABLE "+e.orders+" ADD UNIQUE (body) DEFERRABLE INITIALLY DEFERRED")
	require.NoError(t, err)
	_, err = e.admin.Exec(t.Context(), "INSERT INTO "+e.orders+" (key, amount, body) VALUES ('other', 1, 'taken')")
	require.NoError(t, err)

	var mu sync.Mutex
	var events []idempotency.Event
	srv := serveTx(t, idempotency.Config{Store: e.store(e.pool(t, 2)), Observer: func(ev idempotency.Event) {
		mu.Lock()
		events = append(events, ev)
		mu.Unlock()
	}}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := e.insertOrder(r, 10, "taken") // deferred: fails at COMMIT
		require.NoError(t, err)
		writeOrder(w, id, "taken")
	}))
	key := randomName("deferred-")
	res := mustSend(t, srv, "/orders", key, "{}")
	assertProblem(t, res, http.StatusServiceUnavailable, idempotency.ProblemNotCommitted)
	assert.Nil(t, e.record(t, key), "nothing stored")
	assert.Zero(t, e.orderCount(t, key))

	mu.Lock()
	defer mu.Unlock()
	var notCommitted *idempotency.Event
	for i := range events {
		if events[i].Outcome == idempotency.OutcomeNotCommitted {
			notCommitted = &events[i]
		}
	}
	require.NotNil(t, notCommitted)
	assert.Contains(t, notCommitted.Err.Error(), "rolled back")
	assert.NotContains(t, notCommitted.Err.Error(), "reading the record another request stored")
}

// TestTxReadCommittedByDefault proves that the transactions are READ
// COMMITTED unless WithTxOptions says otherwise, whatever the server's
// default isolation level.
func TestTxReadCommittedByDefault(t *testing.T) {
	e := newTxEnv(t)
	cfg := poolConfig(t)
	cfg.MaxConns = 2
	cfg.ConnConfig.RuntimeParams["default_transaction_isolation"] = "serializable"
	pool := newPool(t, cfg)
	levels := map[string]string{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var level string
		require.NoError(t, postgres.Tx(r.Context()).QueryRow(r.Context(), "SHOW transaction_isolation").Scan(&level))
		levels[r.URL.Path] = level
		w.WriteHeader(http.StatusCreated)
	})
	byDefault := serveTx(t, idempotency.Config{Store: e.store(pool)}, h)
	chosen := serveTx(t, idempotency.Config{Store: e.store(pool, postgres.WithTxOptions(pgx.TxOptions{IsoLevel: pgx.RepeatableRead}))}, h)
	require.Equal(t, http.StatusCreated, mustSend(t, byDefault, "/default", randomName("iso-"), "").status)
	require.Equal(t, http.StatusCreated, mustSend(t, chosen, "/chosen", randomName("iso-"), "").status)
	assert.Equal(t, map[string]string{"/default": "read committed", "/chosen": "repeatable read"}, levels)
}

// TestTxOptionsRefused proves that NewStore refuses transaction options
// under which no response could be stored.
func TestTxOptionsRefused(t *testing.T) {
	cfg, err := pgxpool.ParseConfig("postgres://127.0.0.1:1/none")
	require.NoError(t, err)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg) // connects lazily
	require.NoError(t, err)
	defer pool.Close()
	assert.PanicsWithValue(t, "postgres: WithTxOptions: a read-only transaction cannot store the response", func() {
		postgres.NewStore(pool, postgres.Transactional(), postgres.WithTxOptions(pgx.TxOptions{AccessMode: pgx.ReadOnly}))
	})
	assert.PanicsWithValue(t, "postgres: WithTxOptions: CommitQuery is not supported: the store sends COMMIT with the record", func() {
		postgres.NewStore(pool, postgres.Transactional(), postgres.WithTxOptions(pgx.TxOptions{CommitQuery: "COMMIT AND CHAIN"}))
	})
}
