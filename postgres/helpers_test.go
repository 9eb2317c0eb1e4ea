package postgres_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency/postgres"
)

// dsnEnv names the PostgreSQL the tests run against. Tests that need a
// database skip when it is unset and fail when it is set and the server
// does not answer.
const dsnEnv = "IDEMPOTENCY_POSTGRES_DSN"

// testDSN returns the DSN of the test database, or skips t.
func testDSN(t testing.TB) string {
	t.Helper()
	dsn := os.Getenv(dsnEnv)
	if dsn == "" {
		t.Skip("set " + dsnEnv + "=postgres://user@127.0.0.1:5432/db?sslmode=disable to run tests against a real PostgreSQL")
	}
	return dsn
}

// poolConfig returns a pool configuration for the test database, or skips
// t. The pool stays small: the server is shared.
func poolConfig(t testing.TB) *pgxpool.Config {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(testDSN(t))
	require.NoError(t, err, "%s does not parse", dsnEnv)
	cfg.MaxConns = 8
	return cfg
}

// newPool opens a pool from cfg, closes it when the test ends, and fails
// the test loudly when the server does not answer.
func newPool(t testing.TB, cfg *pgxpool.Config) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := pool.Ping(ctx); err != nil {
		t.Fatalf("%s is set but PostgreSQL does not answer: %v", dsnEnv, err)
	}
	return pool
}

// testPool is newPool on the test database's configuration.
func testPool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	return newPool(t, poolConfig(t))
}

// randomName returns prefix followed by 16 random hex digits.
func randomName(prefix string) string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// randomTable returns a table name no other test uses, and drops that
// table, and only it, when the test ends.
func randomTable(t testing.TB, pool *pgxpool.Pool) string {
	t.Helper()
	name := randomName("idem_test_")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := pool.Exec(ctx, "DROP TABLE IF EXISTS "+pgx.Identifier{name}.Sanitize())
		if err != nil {
			t.Errorf("cleanup: drop table %s: %v", name, err)
		}
	})
	return name
}

// newStore returns a migrated store on a table of its own in pool.
func newStore(t testing.TB, pool *pgxpool.Pool) *postgres.Store {
	t.Helper()
	store := postgres.NewStore(pool, postgres.WithTable(randomTable(t, pool)))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, store.Migrate(ctx))
	return store
}

// queryCounter is a pgx QueryTracer that counts the statements sent
// (Query, QueryRow and Exec calls), whatever their outcome.
type queryCounter struct {
	n atomic.Int64
}

func (c *queryCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	c.n.Add(1)
	return ctx
}

func (c *queryCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// tripCounter counts network round trips on the connections it dials: a
// write that follows a read (or opens the connection) starts one. It sees
// what a statement counter does not, such as a statement prepared on first
// use or a ping before a connection is handed out.
type tripCounter struct {
	n atomic.Int64
}

// dial is a pgconn DialFunc that wraps the connections it makes.
func (c *tripCounter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &tripConn{Conn: conn, trips: &c.n, read: true}, nil
}

type tripConn struct {
	net.Conn
	trips *atomic.Int64
	mu    sync.Mutex
	read  bool // the last operation was a read
}

func (c *tripConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	if c.read {
		c.trips.Add(1)
		c.read = false
	}
	c.mu.Unlock()
	return c.Conn.Write(b)
}

func (c *tripConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.mu.Lock()
		c.read = true
		c.mu.Unlock()
	}
	return n, err
}
