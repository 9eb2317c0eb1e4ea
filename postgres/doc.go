// Package postgres is an [idempotency.Store] kept in a PostgreSQL table
// through pgx v5, for services that already run on PostgreSQL and would
// rather not add a Redis.
//
//	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
//	...
//	store := postgres.NewStore(pool)
//	if err := store.Migrate(ctx); err != nil { ... }
//	mw := idempotency.New(idempotency.Config{Store: store})
//
// # Leases
//
// [Store] has the lease semantics of the Redis store: a request claims its
// key for Config.LockTTL, renews the lease while its handler runs, and
// completes the key with its response or releases it. Each record is one
// row; every operation is one SQL statement, so a first execution costs two
// statements (claim, complete) and a replay or a conflict one. Claim-or-get
// is a single statement: it reads the key and, only when the key is
// absent, expired or already held by the same token, claims it with
// INSERT ... ON CONFLICT DO UPDATE, which re-checks the row as it is at
// that moment. Of any number of concurrent claimers, on any number of
// processes, exactly one wins; a replay or a conflict writes nothing. Lease and TTL expiry are read from the database clock, never
// from the application's, so the processes sharing the table need no clock
// agreement.
//
// As with every lease store, a process that crashes after its handler's
// side effect and before the completion leaves the key to expire after
// LockTTL, and a retry then runs the handler again.
//
// # One transaction
//
// With [Transactional], each covered request with a key runs in a
// transaction of its own instead of under a lease: the handler makes its
// writes through [Tx], and they commit together with the stored response,
// or not at all.
//
//	store := postgres.NewStore(pool, postgres.Transactional())
//	mw := idempotency.New(idempotency.Config{Store: store, RequireKey: true})
//	...
//	tx := postgres.Tx(r.Context()) // nil for a request the middleware does not cover
//	_, err := tx.Exec(r.Context(), `INSERT INTO orders ...`, ...)
//
// The middleware begins the transaction and takes the key with a
// transaction-scoped advisory lock (busy is 409; WaitForInFlight polls it),
// then looks for the key's record in one round trip; it replays a record
// it finds, or runs the handler with its response held in memory, then
// inserts the record and commits in a second round trip, and sends the
// response only once COMMIT succeeded. A 5xx answer, a panic, a failed
// statement or a lost connection rolls everything back, and the retry runs
// afresh; a crash before COMMIT frees the key at once, since the lock ends
// with the connection. The handler's context is not cancelled when the
// client hangs up, only at the transaction's deadline
// ([WithMaxTxDuration]), so that work the retry should find is committed.
// Each request in flight holds one pooled connection while its handler
// runs.
//
// # Schema
//
// [Store.Schema] returns the DDL, for a migration tool; [Store.Migrate]
// applies it when it is missing and is safe to run from every instance at
// start-up. Expired rows are invisible to the store but stay in the table
// until [Store.Sweep] deletes them: run it periodically.
//
// A [Store] is safe for concurrent use by multiple goroutines and
// processes.
package postgres
