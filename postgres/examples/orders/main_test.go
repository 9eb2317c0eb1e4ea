package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

// dsnEnv names the PostgreSQL the tests run against: unset, they skip;
// set and unreachable, they fail.
const dsnEnv = "IDEMPOTENCY_POSTGRES_DSN"

func testDSN(t *testing.T) string {
	t.Helper()
	dsn := os.Getenv(dsnEnv)
	if dsn == "" {
		t.Skip("set " + dsnEnv + "=postgres://user@127.0.0.1:5432/db?sslmode=disable to run the example against a real PostgreSQL")
	}
	return dsn
}

// testPool opens a small pool on the test database and fails loudly when
// it does not answer.
func testPool(t *testing.T) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(testDSN(t))
	require.NoError(t, err, "%s does not parse", dsnEnv)
	cfg.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := pool.Ping(ctx); err != nil {
		t.Fatalf("%s is set but PostgreSQL does not answer: %v", dsnEnv, err)
	}
	return pool
}

// randomTable returns a table name of this test's own and drops that
// table, and only it, when the test ends.
func randomTable(t *testing.T, pool *pgxpool.Pool, prefix string) string {
	t.Helper()
	name := prefix + strings.ToLower(rand.Text())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP TABLE IF EXISTS "+pgx.Identifier{name}.Sanitize()); err != nil {
			t.Errorf("cleanup: drop table %s: %v", name, err)
		}
	})
	return name
}

func countRows(t *testing.T, pool *pgxpool.Pool, table, where string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(t.Context(),
		"SELECT count(*) FROM "+pgx.Identifier{table}.Sanitize()+" WHERE "+where, args...).Scan(&n))
	return n
}

// newTestServer serves the API on tables of its own.
func newTestServer(t *testing.T) (srv *httptest.Server, pool *pgxpool.Pool, keys, orders string, store *postgres.Store) {
	t.Helper()
	pool = testPool(t)
	keys, orders = randomTable(t, pool, "idem_ex_keys_"), randomTable(t, pool, "idem_ex_orders_")
	store = postgres.NewStore(pool, postgres.WithTable(keys), postgres.Transactional())
	require.NoError(t, store.Migrate(t.Context()))
	a, err := newAPI(t.Context(), pool, orders)
	require.NoError(t, err)
	srv = httptest.NewServer(a.routes(store, nil))
	t.Cleanup(srv.Close)
	return srv, pool, keys, orders, store
}

// send posts body to srv's /orders with key (none if empty). It fails no
// test, so that goroutines may call it.
func send(ctx context.Context, srv *httptest.Server, key, body string) (*http.Response, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/orders", strings.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

func post(t *testing.T, srv *httptest.Server, key, body string) (*http.Response, []byte) {
	t.Helper()
	resp, b, err := send(t.Context(), srv, key, body)
	require.NoError(t, err)
	return resp, b
}

func TestFlags(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closed := ln.Addr().String()
	require.NoError(t, ln.Close())

	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no dsn", []string{"-demo"}, "-dsn is required"},
		{"dsn unparsable", []string{"-dsn", "nonsense://x", "-demo"}, "-dsn"},
		{"database unreachable", []string{"-dsn", "postgres://user@" + closed + "/db?sslmode=disable&connect_timeout=5", "-demo"}, "PostgreSQL does not answer"},
		{"unknown flag", []string{"-colour"}, "flag provided but not defined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			err := run(t.Context(), tt.args, &out)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			assert.Empty(t, out.String())
		})
	}
}

func TestDemo(t *testing.T) {
	pool := testPool(t)
	keys, orders := randomTable(t, pool, "idem_ex_keys_"), randomTable(t, pool, "idem_ex_orders_")
	var out bytes.Buffer
	err := run(t.Context(), []string{"-dsn", testDSN(t), "-demo", "-table", keys, "-orders-table", orders}, &out)
	require.NoError(t, err, out.String())

	text := out.String()
	assert.Contains(t, text, "-> 201 Created, Location /orders/1\n")
	assert.Contains(t, text, "-> 201 Created, X-Idempotent-Replayed: true, same body and Location: true\n")
	assert.Contains(t, text, "-> 422 Unprocessable Entity\n")
	assert.Contains(t, text, "#"+idempotency.ProblemKeyReused)
	assert.Contains(t, text, "-> 200 OK\n")
	assert.Contains(t, text, "One order, however often the client retried.")
	assert.NotContains(t, text, "FAILED")
	assert.Equal(t, 1, countRows(t, pool, orders, "true"), "one order in the whole table")
	assert.Equal(t, 1, countRows(t, pool, keys, "true"), "one stored response")
}

// TestConcurrentDuplicates sends one order many times at once with one
// key: exactly one request inserts, the others are refused (409) or
// replayed, and the table holds one row for the key.
func TestConcurrentDuplicates(t *testing.T) {
	srv, pool, _, orders, _ := newTestServer(t)
	key := rand.Text()
	const n = 10
	type result struct {
		status   int
		replayed bool
		body     string
	}
	results := make([]result, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			resp, body, err := send(t.Context(), srv, key, `{"amount":500,"currency":"GBP"}`)
			if errs[i] = err; err == nil {
				results[i] = result{resp.StatusCode, resp.Header.Get(idempotency.ReplayedHeader) == "true", string(body)}
			}
		})
	}
	close(start)
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}

	var executed []result
	for _, r := range results {
		switch {
		case r.status == http.StatusCreated && !r.replayed:
			executed = append(executed, r)
		case r.status == http.StatusCreated, r.status == http.StatusConflict:
		default:
			t.Errorf("got %d %s, want 201 once and 409 or a replay otherwise", r.status, r.body)
		}
	}
	require.Len(t, executed, 1, "exactly one request runs the handler")
	for _, r := range results {
		if r.replayed {
			assert.Equal(t, executed[0].body, r.body)
		}
	}
	assert.Equal(t, 1, countRows(t, pool, orders, "idempotency_key = $1", key))
}

func TestCreateAndGet(t *testing.T) {
	srv, pool, _, orders, _ := newTestServer(t)
	key := rand.Text()
	resp, body := post(t, srv, key, `{"amount":1299,"currency":"EUR"}`)
	require.Equal(t, http.StatusCreated, resp.StatusCode, string(body))
	var created order
	require.NoError(t, json.Unmarshal(body, &created))
	assert.Equal(t, int64(1299), created.Amount)
	assert.Equal(t, "EUR", created.Currency)
	assert.Equal(t, "/orders/1", resp.Header.Get("Location"))

	get, err := srv.Client().Get(srv.URL + resp.Header.Get("Location"))
	require.NoError(t, err)
	defer get.Body.Close()
	require.Equal(t, http.StatusOK, get.StatusCode)
	var read order
	require.NoError(t, json.NewDecoder(get.Body).Decode(&read))
	assert.Equal(t, created.ID, read.ID)
	assert.True(t, created.CreatedAt.Equal(read.CreatedAt))

	retry, again := post(t, srv, key, `{"amount":1299,"currency":"EUR"}`)
	assert.Equal(t, http.StatusCreated, retry.StatusCode)
	assert.Equal(t, "true", retry.Header.Get(idempotency.ReplayedHeader))
	assert.Equal(t, string(body), string(again))

	reused, _ := post(t, srv, key, `{"amount":1300,"currency":"EUR"}`)
	assert.Equal(t, http.StatusUnprocessableEntity, reused.StatusCode)
	assert.Equal(t, 1, countRows(t, pool, orders, "idempotency_key = $1", key))

	for _, path := range []string{"/orders/999", "/orders/x"} {
		resp, err := srv.Client().Get(srv.URL + path)
		require.NoError(t, err)
		_ = resp.Body.Close()
		assert.Equal(t, http.StatusNotFound, resp.StatusCode, path)
		assert.Equal(t, "application/problem+json", resp.Header.Get("Content-Type"), path)
	}
}

func TestCreateValidation(t *testing.T) {
	srv, pool, _, orders, _ := newTestServer(t)
	tests := []struct {
		name, key, body string
		status          int
		detail          string
	}{
		{"not JSON", "k-json", `pay me`, http.StatusBadRequest, `The body must be a JSON object such as {"amount":1299,"currency":"EUR"}`},
		{"trailing data", "k-trailing", `{"amount":1,"currency":"EUR"} {}`, http.StatusBadRequest, `The body must be a JSON object such as {"amount":1299,"currency":"EUR"}`},
		{"unknown field", "k-field", `{"amount":1,"currency":"EUR","to":"me"}`, http.StatusBadRequest, `The body must be a JSON object such as {"amount":1299,"currency":"EUR"}`},
		{"fractional amount", "k-fraction", `{"amount":12.5,"currency":"EUR"}`, http.StatusBadRequest, `The body must be a JSON object such as {"amount":1299,"currency":"EUR"}`},
		{"zero amount", "k-zero", `{"amount":0,"currency":"EUR"}`, http.StatusUnprocessableEntity, "amount must be between 1 and 1000000 cents"},
		{"huge amount", "k-huge", `{"amount":1000001,"currency":"EUR"}`, http.StatusUnprocessableEntity, "amount must be between 1 and 1000000 cents"},
		{"bad currency", "k-currency", `{"amount":1,"currency":"eur"}`, http.StatusUnprocessableEntity, "currency must be EUR, GBP or USD"},
		{"no key", "", `{"amount":1,"currency":"EUR"}`, http.StatusBadRequest, "Idempotency-Key header is required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := post(t, srv, tt.key, tt.body)
			assert.Equal(t, tt.status, resp.StatusCode)
			assert.Equal(t, "application/problem+json", resp.Header.Get("Content-Type"))
			var p idempotency.Problem
			require.NoError(t, json.Unmarshal(body, &p), string(body))
			assert.Equal(t, tt.detail, p.Detail)
		})
	}
	assert.Equal(t, 0, countRows(t, pool, orders, "true"))
}

// TestFailedInsertRollsBack points the handler at a missing table: the
// INSERT fails, the 500 is not stored, and the retry with the same key
// runs afresh once the table is there.
func TestFailedInsertRollsBack(t *testing.T) {
	srv, pool, keys, orders, store := newTestServer(t)
	broken := httptest.NewServer((&api{pool: pool, table: pgx.Identifier{orders + "_missing"}.Sanitize()}).routes(store, nil))
	t.Cleanup(broken.Close)
	key := rand.Text()

	resp, body := post(t, broken, key, `{"amount":700,"currency":"USD"}`)
	assert.Equal(t, http.StatusInternalServerError, resp.StatusCode)
	assert.Contains(t, string(body), "The order could not be saved")
	assert.Equal(t, 0, countRows(t, pool, keys, "true"), "nothing stored")

	resp, body = post(t, srv, key, `{"amount":700,"currency":"USD"}`)
	assert.Equal(t, http.StatusCreated, resp.StatusCode, string(body))
	assert.Empty(t, resp.Header.Get(idempotency.ReplayedHeader))
	assert.Equal(t, 1, countRows(t, pool, orders, "idempotency_key = $1", key))
}
