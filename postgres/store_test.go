package postgres_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
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
	"github.com/f8e778d0/idempotency/storetest"
)

// TestConformance runs the store conformance suite against a real
// PostgreSQL, on a table of the test's own.
func TestConformance(t *testing.T) {
	store := newStore(t, testPool(t))
	storetest.Run(t, func(*testing.T) idempotency.Store { return store })
}

// TestConformanceSchemaQualified runs the suite on a table in a schema of
// the test's own, named "schema.table".
func TestConformanceSchemaQualified(t *testing.T) {
	pool := testPool(t)
	schema := randomName("idem_test_schema_")
	ctx := t.Context()
	_, err := pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			t.Errorf("cleanup: drop schema %s: %v", schema, err)
		}
	})

	store := postgres.NewStore(pool, postgres.WithTable(schema+".Keys"))
	require.NoError(t, store.Migrate(ctx))
	var tables int
	require.NoError(t, pool.QueryRow(ctx,
		"SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'Keys'", schema).Scan(&tables))
	require.Equal(t, 1, tables, "the table is created in the schema, with its name as given")
	storetest.Run(t, func(*testing.T) idempotency.Store { return store })
}

// TestConformanceExecModes runs the suite with the pgx query modes that
// work behind a pooler that keeps no prepared statements (PgBouncer in
// transaction pooling before 1.21): unnamed statements with parameter
// types taken from the Go values, and the simple protocol.
func TestConformanceExecModes(t *testing.T) {
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol} {
		t.Run(mode.String(), func(t *testing.T) {
			cfg := poolConfig(t)
			cfg.ConnConfig.DefaultQueryExecMode = mode
			store := newStore(t, newPool(t, cfg))
			storetest.Run(t, func(*testing.T) idempotency.Store { return store })
		})
	}
}

// TestConcurrentClaimsThreePools races 200 claims of one key through three
// pools, as three processes would: exactly one wins and every other one
// sees the winner's claim. It does so for an absent key and for a key whose
// lease has just run out.
func TestConcurrentClaimsThreePools(t *testing.T) {
	const claimers = 200
	first := testPool(t)
	table := randomTable(t, first)
	stores := make([]*postgres.Store, 3)
	for i := range stores {
		pool := first
		if i > 0 {
			pool = testPool(t)
		}
		stores[i] = postgres.NewStore(pool, postgres.WithTable(table))
	}
	require.NoError(t, stores[0].Migrate(t.Context()))

	race := func(t *testing.T, key string) {
		type result struct {
			token string
			rec   *idempotency.Record
			err   error
		}
		results := make([]result, claimers)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range results {
			results[i].token = randomName("token-")
			store := stores[i%len(stores)]
			wg.Go(func() {
				<-start
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				results[i].rec, results[i].err = store.Claim(ctx, key, results[i].token, time.Minute)
			})
		}
		close(start)
		wg.Wait()

		var winners []string
		for _, r := range results {
			require.NoError(t, r.err)
			if r.rec == nil {
				winners = append(winners, r.token)
			}
		}
		require.Len(t, winners, 1, "exactly one claim wins")
		for _, r := range results {
			if r.rec != nil {
				assert.Equal(t, idempotency.StateInFlight, r.rec.State)
				assert.Equal(t, winners[0], r.rec.Token)
				assert.Positive(t, r.rec.LeaseRemaining)
			}
		}
	}

	t.Run("AbsentKey", func(t *testing.T) {
		race(t, randomKey())
	})
	t.Run("ExpiredLease", func(t *testing.T) {
		key := randomKey()
		rec, err := stores[0].Claim(t.Context(), key, "stale-owner", 50*time.Millisecond)
		require.NoError(t, err)
		require.Nil(t, rec)
		time.Sleep(100 * time.Millisecond)
		race(t, key)
		assert.ErrorIs(t, stores[1].Extend(t.Context(), key, "stale-owner", time.Minute), idempotency.ErrNotOwner)
	})
}

// TestCorruptRows writes rows the store cannot read, as a later release or
// a hand edit might: Claim and Get report ErrCorruptRecord and never treat
// the key as free; Extend, Complete and Release refuse to touch them;
// Delete removes them.
func TestCorruptRows(t *testing.T) {
	pool := testPool(t)
	table := randomTable(t, pool)
	store := postgres.NewStore(pool, postgres.WithTable(table))
	require.NoError(t, store.Migrate(t.Context()))
	insert := func(t *testing.T, version, state int, header []byte) string {
		key := randomKey()
		_, err := pool.Exec(t.Context(), fmt.Sprintf(
			`INSERT INTO %s (key, version, token, state, status, header, expires_at)
			 VALUES ($1, $2, 'tok', $3, 201, $4, now() + interval '1 hour')`, pgx.Identifier{table}.Sanitize()),
			key, version, state, header)
		require.NoError(t, err)
		return key
	}
	cases := []struct {
		name    string
		version int
		state   int
		header  []byte
	}{
		{"UnknownVersion", 9, 2, nil},
		{"UnknownState", 1, 7, nil},
		{"TruncatedHeader", 1, 2, []byte{1, 5, 'a'}},
		{"HugeHeaderCount", 1, 2, []byte{0xff, 0xff, 0xff, 0x7f}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			key := insert(t, c.version, c.state, c.header)
			ctx := t.Context()
			rec, err := store.Claim(ctx, key, "another", time.Minute)
			assert.ErrorIs(t, err, idempotency.ErrCorruptRecord, "Claim")
			assert.Nil(t, rec)
			_, err = store.Get(ctx, key)
			assert.ErrorIs(t, err, idempotency.ErrCorruptRecord, "Get")
			if c.version != 1 {
				assert.ErrorIs(t, store.Extend(ctx, key, "tok", time.Minute), idempotency.ErrNotOwner)
				assert.ErrorIs(t, store.Complete(ctx, key, "tok", &idempotency.Record{
					State: idempotency.StateCompleted, Response: idempotency.Response{StatusCode: 200},
				}, time.Minute), idempotency.ErrNotOwner)
				assert.ErrorIs(t, store.Release(ctx, key, "tok"), idempotency.ErrNotOwner)
				_, err = store.Get(ctx, key)
				assert.ErrorIs(t, err, idempotency.ErrCorruptRecord, "the row is left as it was")
			}
			require.NoError(t, store.Delete(ctx, key))
			rec, err = store.Claim(ctx, key, "another", time.Minute)
			require.NoError(t, err)
			assert.Nil(t, rec, "after Delete the key is free")
		})
	}
}

// TestHeaderColumn checks what the header column keeps: every value of a
// multi-valued header in order, commas inside values, bytes that are not
// UTF-8, and a nil header as NULL.
func TestHeaderColumn(t *testing.T) {
	pool := testPool(t)
	store := newStore(t, pool)
	ctx := t.Context()
	cases := []struct {
		name   string
		header http.Header
	}{
		{"MultiValued", http.Header{
			"Set-Thing": {"b", "a", "c, d", ""},
			"Latin1":    {"caf\xe9", "\xff\x00\x80"},
			"Empty":     {},
		}},
		{"Nil", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			key := randomKey()
			rec, err := store.Claim(ctx, key, "owner", time.Minute)
			require.NoError(t, err)
			require.Nil(t, rec)
			require.NoError(t, store.Complete(ctx, key, "owner", &idempotency.Record{
				State:    idempotency.StateCompleted,
				Token:    "owner",
				Response: idempotency.Response{StatusCode: 201, Header: c.header.Clone()},
			}, time.Minute))
			got, err := store.Get(ctx, key)
			require.NoError(t, err)
			require.NotNil(t, got)
			assert.Equal(t, c.header, got.Response.Header)
		})
	}
}

// TestClaimTimeoutWhileLocked checks that the context bounds a Claim that
// waits for a row lock, and that the claim, which the server may still
// carry out after the client gave up, is settled by re-sending it with the
// same token: the key is then held by that token, never by two.
func TestClaimTimeoutWhileLocked(t *testing.T) {
	pool := testPool(t)
	store := newStore(t, pool)
	key := randomKey()
	ctx := t.Context()
	rec, err := store.Claim(ctx, key, "owner", 50*time.Millisecond)
	require.NoError(t, err)
	require.Nil(t, rec)
	time.Sleep(100 * time.Millisecond)

	// Hold the expired row locked, so the takeover waits.
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(context.Background()) }()
	_, err = tx.Exec(ctx, "SELECT 1 FROM "+tableOf(t, store)+" WHERE key = $1 FOR UPDATE", key)
	require.NoError(t, err)

	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = store.Claim(short, key, "impatient", time.Minute)
	require.Error(t, err)
	assert.Less(t, time.Since(start), 2*time.Second, "the context bounds a claim that waits for a lock")
	require.NoError(t, tx.Rollback(ctx))

	rec, err = store.Claim(ctx, key, "impatient", time.Minute)
	require.NoError(t, err)
	assert.Nil(t, rec, "the re-sent claim holds the key")
	rec, err = store.Claim(ctx, key, "other", time.Minute)
	require.NoError(t, err)
	require.NotNil(t, rec)
	assert.Equal(t, "impatient", rec.Token)
}

// TestNewStorePanics checks the programmer errors NewStore refuses.
func TestNewStorePanics(t *testing.T) {
	pool, err := pgxpool.New(context.Background(), "postgres://127.0.0.1:1/none")
	require.NoError(t, err) // no I/O
	t.Cleanup(pool.Close)
	assert.PanicsWithValue(t, "postgres: NewStore needs a non-nil pool", func() { postgres.NewStore(nil) })
	for _, name := range []string{"", "a.b.c", ".t", "s.", "bad\x00name", "\xff", strings.Repeat("x", 49), strings.Repeat("s", 64) + ".t"} {
		assert.Panics(t, func() { postgres.NewStore(pool, postgres.WithTable(name)) }, "table %q", name)
	}
	for _, name := range []string{"t", "s.t", `we"ird`, "Mixed Case", strings.Repeat("x", 48), strings.Repeat("s", 63) + ".t"} {
		assert.NotPanics(t, func() { postgres.NewStore(pool, postgres.WithTable(name)) }, "table %q", name)
	}
}

// TestNoDatabaseIO checks that NewStore, Schema and an operation on an
// unreachable server behave: no I/O in the constructor, an error (not a
// hang, not ErrNotOwner) from the operation.
func TestNoDatabaseIO(t *testing.T) {
	pool, err := pgxpool.New(context.Background(), "postgres://u@127.0.0.1:1/none?connect_timeout=1")
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	store := postgres.NewStore(pool)
	assert.Contains(t, store.Schema(), `CREATE TABLE IF NOT EXISTS "idempotency_keys"`)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, err = store.Claim(ctx, randomKey(), "tok", time.Minute)
	require.Error(t, err)
	assert.False(t, errors.Is(err, idempotency.ErrNotOwner))
}

// randomKey returns a key shaped like the middleware's storage keys.
func randomKey() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// tableOf returns the quoted table of a store built by these tests, read
// back from its DDL.
func tableOf(t *testing.T, s *postgres.Store) string {
	t.Helper()
	var table string
	_, err := fmt.Sscanf(s.Schema(), "CREATE TABLE IF NOT EXISTS %s (", &table)
	require.NoError(t, err)
	return table
}
