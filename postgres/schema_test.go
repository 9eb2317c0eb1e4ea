package postgres_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency/postgres"
)

// TestMigrateConcurrently runs Migrate from five goroutines on separate
// connections at once, as instances starting together would: all succeed,
// the table, its expiry index and its schema comment exist once, and a
// later Migrate changes nothing.
func TestMigrateConcurrently(t *testing.T) {
	cfg := poolConfig(t)
	cfg.MaxConns = 5
	pool := newPool(t, cfg)
	table := randomTable(t, pool)
	store := postgres.NewStore(pool, postgres.WithTable(table))

	errs := make([]error, 5)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range errs {
		wg.Go(func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			errs[i] = store.Migrate(ctx)
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "Migrate %d", i)
	}

	ctx := t.Context()
	var comment string
	require.NoError(t, pool.QueryRow(ctx,
		"SELECT obj_description(to_regclass($1), 'pg_class')", pgx.Identifier{table}.Sanitize()).Scan(&comment))
	assert.Equal(t, "github.com/f8e778d0/idempotency/postgres schema 1", comment)
	var indexdef string
	require.NoError(t, pool.QueryRow(ctx,
		"SELECT indexdef FROM pg_indexes WHERE tablename = $1 AND indexname = $2",
		table, table+"_expires_at_idx").Scan(&indexdef))
	assert.Contains(t, indexdef, "(expires_at)")

	// A second Migrate finds the schema in place and runs no DDL.
	var before, after int64
	require.NoError(t, pool.QueryRow(ctx, "SELECT pg_relation_filenode(to_regclass($1))::bigint",
		pgx.Identifier{table}.Sanitize()).Scan(&before))
	require.NoError(t, store.Migrate(ctx))
	require.NoError(t, pool.QueryRow(ctx, "SELECT pg_relation_filenode(to_regclass($1))::bigint",
		pgx.Identifier{table}.Sanitize()).Scan(&after))
	assert.Equal(t, before, after)
}

// TestMigrateLeavesForeignTable checks that Migrate refuses a table of the
// store's name that Schema did not create, and changes nothing in it.
func TestMigrateLeavesForeignTable(t *testing.T) {
	pool := testPool(t)
	table := randomTable(t, pool)
	ctx := t.Context()
	_, err := pool.Exec(ctx, "CREATE TABLE "+pgx.Identifier{table}.Sanitize()+" (id int)")
	require.NoError(t, err)

	err = postgres.NewStore(pool, postgres.WithTable(table)).Migrate(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "without the schema comment")
	var indexes int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM pg_indexes WHERE tablename = $1", table).Scan(&indexes))
	assert.Zero(t, indexes)
}

// TestSchemaAppliedByHand checks that the DDL of Schema, applied by a
// migration tool rather than Migrate, gives a working store that Migrate
// then recognises.
func TestSchemaAppliedByHand(t *testing.T) {
	pool := testPool(t)
	store := postgres.NewStore(pool, postgres.WithTable(randomTable(t, pool)))
	ctx := t.Context()
	_, err := pool.Exec(ctx, store.Schema())
	require.NoError(t, err)
	_, err = pool.Exec(ctx, store.Schema())
	require.NoError(t, err, "the DDL can be applied twice")
	require.NoError(t, store.Migrate(ctx))
	rec, err := store.Claim(ctx, randomKey(), "tok", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, rec)
}

// TestSweep checks that Sweep deletes expired rows, in flight and
// completed, in statements of at most limit rows, and keeps live ones.
func TestSweep(t *testing.T) {
	cfg := poolConfig(t)
	queries := &queryCounter{}
	cfg.ConnConfig.Tracer = queries
	pool := newPool(t, cfg)
	store := newStore(t, pool)
	ctx := t.Context()

	const expired, live, limit = 23, 4, 5
	for i := range expired {
		key := randomKey()
		rec, err := store.Claim(ctx, key, "tok", time.Millisecond)
		require.NoError(t, err)
		require.Nil(t, rec)
		if i%2 == 0 {
			// Completed with a TTL that ends at once: a completed row
			// expires the same way.
			_, err = pool.Exec(ctx, "UPDATE "+tableOf(t, store)+" SET state = 2, status = 200, expires_at = now() - interval '1 second' WHERE key = $1", key)
			require.NoError(t, err)
		}
	}
	liveKeys := make([]string, live)
	for i := range liveKeys {
		liveKeys[i] = randomKey()
		_, err := store.Claim(ctx, liveKeys[i], "tok", time.Hour)
		require.NoError(t, err)
	}
	time.Sleep(10 * time.Millisecond)

	start := queries.n.Load()
	n, err := store.Sweep(ctx, limit)
	require.NoError(t, err)
	assert.Equal(t, expired, n)
	assert.Equal(t, int64(expired/limit+1), queries.n.Load()-start, "one statement per batch of %d", limit)

	var rows int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM "+tableOf(t, store)).Scan(&rows))
	assert.Equal(t, live, rows)
	for _, key := range liveKeys {
		rec, err := store.Get(ctx, key)
		require.NoError(t, err)
		assert.NotNil(t, rec)
	}

	n, err = store.Sweep(ctx, 0)
	require.NoError(t, err)
	assert.Zero(t, n)

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	_, err = store.Sweep(cancelled, limit)
	assert.ErrorIs(t, err, context.Canceled)
}
