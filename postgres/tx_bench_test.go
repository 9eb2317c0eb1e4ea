package postgres_test

// BenchmarkTx measures the one-transaction mode against the handler doing
// its own transaction, with the harness of the root package's benchmarks:
// requests built with httptest.NewRequest and a 100-byte JSON body, an
// httptest.ResponseRecorder, no network HTTP. The handler drains the body,
// inserts one order row and answers 201 with a 100-byte JSON body.
//
//	IDEMPOTENCY_POSTGRES_DSN=postgres://user@127.0.0.1:5432/db?sslmode=disable \
//		go test -run '^$' -bench BenchmarkTx -benchmem -count=6 .

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

// txBenchRequest and txBenchResponse are the 100-byte JSON bodies.
var (
	txBenchRequest  = []byte(`{"customer":"cus_0001","item":"book","quantity":1,"currency":"EUR","amount":1999,"note":"gift wrap"}`)
	txBenchResponse = []byte(`{"id":"ord_000000000001","status":"created","item":"book","quantity":1,"amount":1999,"currency":"EUR"}`)
)

// txBenchServe sends one request with the key header value key through h.
func txBenchServe(h http.Handler, key []string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(http.MethodPost, "/orders", bytes.NewReader(txBenchRequest))
	r.Header["Idempotency-Key"] = key
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// txBenchKeys returns n distinct key header values, built before the timer.
func txBenchKeys(n int) [][]string {
	prefix := randomName("bench-") + "-"
	keys := make([][]string, n)
	for i := range keys {
		keys[i] = []string{prefix + strconv.Itoa(i)}
	}
	return keys
}

// BenchmarkTx: "bare" is a handler that runs BEGIN, its INSERT and COMMIT
// itself on the pool, with no middleware; "first" is the same INSERT
// through postgres.Tx in the one-transaction mode, a new key each time;
// "replay" replays one key. "statements" is a handler that sends, without
// the middleware, what "first" sends in the same three round trips, so
// that first minus statements is the middleware's share.
func BenchmarkTx(b *testing.B) {
	cfg := poolConfig(b)
	cfg.MaxConns = 4
	pool := newPool(b, cfg)
	ctx := context.Background()
	orders := pgx.Identifier{randomTable(b, pool)}.Sanitize()
	_, err := pool.Exec(ctx, "CREATE TABLE "+orders+" (id bigserial, key text NOT NULL, amount int NOT NULL, body text NOT NULL)")
	require.NoError(b, err)
	store := postgres.NewStore(pool, postgres.WithTable(randomTable(b, pool)), postgres.Transactional())
	require.NoError(b, store.Migrate(ctx))
	insert := "INSERT INTO " + orders + " (key, amount, body) VALUES ($1, $2, $3)"

	answer := func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write(txBenchResponse)
	}
	bare := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		ctx := r.Context()
		tx, err := pool.Begin(ctx)
		if err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		defer func() { _ = tx.Rollback(ctx) }()
		if _, err := tx.Exec(ctx, insert, r.Header.Get("Idempotency-Key"), 1999, body); err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		if err := tx.Commit(ctx); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		answer(w)
	})
	inTx := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		ctx := r.Context()
		key, _ := idempotency.KeyFromContext(ctx)
		if _, err := postgres.Tx(ctx).Exec(ctx, insert, key, 1999, body); err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		answer(w)
	})
	mw := idempotency.New(idempotency.Config{Store: store})(inTx)
	statements := txStatementsHandler(store, pool, insert, answer)

	check := func(b *testing.B, w *httptest.ResponseRecorder, replayed bool) {
		if w.Code != http.StatusCreated || (w.Header().Get(idempotency.ReplayedHeader) == "true") != replayed {
			b.Fatalf("got %d (replayed %q), want 201 (replayed %v): %s",
				w.Code, w.Header().Get(idempotency.ReplayedHeader), replayed, w.Body)
		}
	}
	// Warm up the statements on every connection of the pool.
	for range 2 * cfg.MaxConns {
		check(b, txBenchServe(bare, txBenchKeys(1)[0]), false)
		check(b, txBenchServe(mw, txBenchKeys(1)[0]), false)
	}

	// Each request with a key of its own.
	newKeys := func(name string, h http.Handler) {
		b.Run(name, func(b *testing.B) {
			keys := txBenchKeys(b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				check(b, txBenchServe(h, keys[i]), false)
			}
		})
	}
	newKeys("bare", bare)
	newKeys("statements", statements)
	newKeys("first", mw)
	b.Run("replay", func(b *testing.B) {
		key := txBenchKeys(1)[0]
		check(b, txBenchServe(mw, key), false)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			check(b, txBenchServe(mw, key), true)
		}
	})
}

// txStatementsHandler returns a handler that sends, with no middleware,
// the statements of a first execution in the one-transaction mode, batched
// as the store batches them: BEGIN, the try-lock and the look-up; the
// handler's INSERT; the removal of an expired row, the record insert and
// COMMIT. The record holds the answer of the benchmark's handlers.
func txStatementsHandler(store *postgres.Store, pool *pgxpool.Pool, insert string, answer func(http.ResponseWriter)) http.Handler {
	header := postgres.EncodeHeader(http.Header{"Content-Type": {"application/json"}})
	fingerprint := make([]byte, sha256.Size)
	fail := func(w http.ResponseWriter, err error) {
		http.Error(w, err.Error(), http.StatusInternalServerError)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		ctx := r.Context()
		key := r.Header.Get("Idempotency-Key")
		lock, lockKey, lookup, takeOver, insertRecord := store.TxStatements(key)
		conn, err := pool.Acquire(ctx)
		if err != nil {
			fail(w, err)
			return
		}
		defer conn.Release()

		begin := &pgx.Batch{}
		begin.BeginTx(pgx.TxOptions{IsoLevel: pgx.ReadCommitted})
		begin.Queue(lock, lockKey)
		begin.Queue(lookup, key)
		br := conn.SendBatch(ctx, begin)
		tx := br.Tx()
		var locked bool
		_, err = br.Exec()
		if err == nil {
			err = br.QueryRow().Scan(&locked)
		}
		if err == nil {
			// A new key: the look-up finds nothing.
			if err = br.QueryRow().Scan(); errors.Is(err, pgx.ErrNoRows) && locked {
				err = nil
			}
		}
		if cerr := br.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			fail(w, err)
			return
		}

		if _, err := tx.Exec(ctx, insert, key, 1999, body); err != nil {
			fail(w, err)
			return
		}

		commit := &pgx.Batch{}
		commit.Queue(takeOver, key)
		commit.Queue(insertRecord, key, int32(http.StatusCreated), header, txBenchResponse, fingerprint, nil, int64(24*time.Hour/time.Microsecond))
		commit.Queue("COMMIT")
		br = conn.SendBatch(ctx, commit)
		for range commit.Len() {
			if _, err = br.Exec(); err != nil {
				break
			}
		}
		if cerr := br.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			fail(w, err)
			return
		}
		answer(w)
	})
}
