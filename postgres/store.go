package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/f8e778d0/idempotency"
)

// DefaultTable is the table a [Store] built without [WithTable] uses.
const DefaultTable = "idempotency_keys"

// recordVersion is written in the version column of every row. A row of
// another version is unreadable to this code: Claim and Get report it as
// [idempotency.ErrCorruptRecord], and Extend, Complete and Release never
// change it. A later release that changes what a row means (a new
// fingerprint rule, say) writes a new version, so that instances of this
// release refuse its rows instead of misreading them during a rolling
// upgrade.
const recordVersion = 1

// settleAttempts bounds how often Claim and Complete re-send their
// statement when it raced with a concurrent change (see claimSQL).
const settleAttempts = 5

// Store is an [idempotency.Store] that keeps its records in a PostgreSQL
// table, one row per key. Build it with [NewStore].
//
// A Store is safe for concurrent use by multiple goroutines and processes.
// Every call is bounded by its context: when it ends, pgx returns at once
// and, by default, closes the connection. A statement the server already
// runs may still take effect, as the [idempotency.Store] contract allows;
// the middleware's re-sent Complete, or the lease running out, settles it.
type Store struct {
	pool  *pgxpool.Pool
	table string // quoted, possibly schema-qualified
	name  string // as given to WithTable, for messages and to_regclass
	index string // quoted name of the index on expires_at

	claimSQL, extendSQL, completeSQL, releaseSQL, getSQL, deleteSQL, sweepSQL string

	// The one-transaction mode (tx.go).
	tx                     bool
	txOptions              pgx.TxOptions
	maxTx                  time.Duration
	takeOverSQL, insertSQL string
}

var _ idempotency.Store = (*Store)(nil)

// Option configures a [Store].
type Option func(*options)

type options struct {
	table     string
	tx        bool
	txOptions pgx.TxOptions
	maxTx     time.Duration
}

// WithTable sets the table that holds the records: a name, or a schema and
// a name separated by a dot ("app.idempotency_keys"). Each part is used
// exactly as given, quoted, so it is case-sensitive and may hold any
// character but a dot and NUL; the name is at most 48 bytes (the index
// name adds a suffix to it and PostgreSQL names hold 63) and the schema at
// most 63. An unqualified name is found through the connection's
// search_path. The default is [DefaultTable].
func WithTable(name string) Option {
	return func(o *options) { o.table = name }
}

// NewStore returns a store that keeps its records in a table reached
// through pool. It does no I/O: create the table with [Store.Migrate] or
// with the DDL of [Store.Schema] before the first request. It panics if
// pool is nil, the table name is invalid or the maximum transaction
// duration is not positive.
func NewStore(pool *pgxpool.Pool, opts ...Option) *Store {
	if pool == nil {
		panic("postgres: NewStore needs a non-nil pool")
	}
	o := options{table: DefaultTable, maxTx: DefaultMaxTxDuration}
	for _, opt := range opts {
		opt(&o)
	}
	table, index, err := quoteTable(o.table)
	if err != nil {
		panic("postgres: " + err.Error())
	}
	if o.maxTx <= 0 {
		panic(fmt.Sprintf("postgres: WithMaxTxDuration(%v): the duration must be positive", o.maxTx))
	}
	switch {
	case o.txOptions.AccessMode == pgx.ReadOnly:
		panic("postgres: WithTxOptions: a read-only transaction cannot store the response")
	case o.txOptions.CommitQuery != "":
		panic("postgres: WithTxOptions: CommitQuery is not supported: the store sends COMMIT with the record")
	case o.txOptions.IsoLevel == "":
		o.txOptions.IsoLevel = pgx.ReadCommitted
	}
	s := &Store{pool: pool, table: table, name: o.table, index: index,
		tx: o.tx, txOptions: o.txOptions, maxTx: o.maxTx}
	s.buildSQL()
	return s
}

// The statements, with TABLE standing for the quoted table name. Every
// time comes from the database clock: clock_timestamp() where a row is
// checked or written, so a statement that waited for a row lock sees the
// time it acts at; now() in Sweep, whose condition must be stable for the
// expiry index to serve it. Durations travel as whole microseconds.
const (
	// claimSQL claims $1 for token $2 with a lease of $3 microseconds, or
	// returns the live record that is there.
	//
	// The live CTE reads the key as the statement's snapshot sees it. When
	// it finds a live record that the caller may not take (in flight under
	// another token, completed, or of an unknown version), the INSERT has
	// no row to insert, so a replay or a conflict reads and writes nothing.
	// Otherwise the INSERT claims the key; ON CONFLICT re-checks the row
	// as it is now, so that of concurrent claimers exactly one inserts or
	// takes over an expired row, and a claim re-sent by its own token
	// renews it. RETURNING then reports the claim.
	//
	// The one case this cannot answer in one statement is a row that
	// changed after the snapshot was taken: the snapshot shows it free (or
	// not at all) and ON CONFLICT finds it taken. The statement then
	// returns neither a claim nor a record, and Claim sends it again with a
	// new snapshot.
	claimSQL = `WITH live AS (
	SELECT r.version, r.token, r.state, r.status, r.header, r.body, r.fingerprint, r.not_stored,
		(extract(epoch FROM l.remaining) * 1000000)::bigint AS remaining
	FROM TABLE AS r, LATERAL (SELECT r.expires_at - clock_timestamp() AS remaining) AS l
	WHERE r.key = $1 AND l.remaining > interval '0'
		AND NOT (r.version = 1 AND r.state = 1 AND r.token = $2)
), claimed AS (
	INSERT INTO TABLE AS r (key, version, token, state, expires_at)
	SELECT $1, 1, $2, 1, clock_timestamp() + $3::bigint * interval '1 microsecond'
	WHERE NOT EXISTS (SELECT FROM live)
	ON CONFLICT (key) DO UPDATE SET
		version = 1, token = excluded.token, state = 1, status = NULL, header = NULL,
		body = NULL, fingerprint = NULL, not_stored = NULL, expires_at = excluded.expires_at
	WHERE r.expires_at <= clock_timestamp()
		OR (r.version = 1 AND r.state = 1 AND r.token = excluded.token)
	RETURNING 1
)
SELECT EXISTS (SELECT FROM claimed), live.*
FROM (VALUES (1)) AS one (x) LEFT JOIN live ON true`

	// extendSQL sets the lease of $1, in flight under $2, to $3
	// microseconds from now.
	extendSQL = `UPDATE TABLE
SET expires_at = clock_timestamp() + $3::bigint * interval '1 microsecond'
WHERE key = $1 AND token = $2 AND state = 1 AND version = 1 AND expires_at > clock_timestamp()`

	// completeSQL completes $1, in flight under $2, with status $3, header
	// $4, body $5, fingerprint $6 and not-stored reason $7, kept for $8
	// microseconds. Its second column tells, when nothing was updated, the
	// state of a live row of token $2: completed (a re-sent Complete), in
	// flight (the row changed after the snapshot: send it again) or none.
	completeSQL = `WITH done AS (
	UPDATE TABLE
	SET state = 2, status = $3, header = $4, body = $5, fingerprint = $6, not_stored = $7,
		expires_at = clock_timestamp() + $8::bigint * interval '1 microsecond'
	WHERE key = $1 AND token = $2 AND state = 1 AND version = 1 AND expires_at > clock_timestamp()
	RETURNING 1
)
SELECT EXISTS (SELECT FROM done),
	(SELECT state FROM TABLE
	 WHERE key = $1 AND token = $2 AND version = 1 AND expires_at > clock_timestamp())`

	// releaseSQL deletes $1 if it is in flight under $2.
	releaseSQL = `DELETE FROM TABLE
WHERE key = $1 AND token = $2 AND state = 1 AND version = 1 AND expires_at > clock_timestamp()`

	// getSQL reads the live record under $1.
	getSQL = `SELECT r.version, r.token, r.state, r.status, r.header, r.body, r.fingerprint, r.not_stored,
	(extract(epoch FROM l.remaining) * 1000000)::bigint
FROM TABLE AS r, LATERAL (SELECT r.expires_at - clock_timestamp() AS remaining) AS l
WHERE r.key = $1 AND l.remaining > interval '0'`

	// deleteSQL deletes $1 whatever its state.
	deleteSQL = `DELETE FROM TABLE WHERE key = $1`

	// sweepSQL deletes at most $1 expired rows, oldest first, skipping rows
	// another transaction holds.
	sweepSQL = `DELETE FROM TABLE
WHERE key IN (
	SELECT key FROM TABLE WHERE expires_at <= now()
	ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
) AND expires_at <= now()`
)

// buildSQL fills in the statements for s's table.
func (s *Store) buildSQL() {
	r := strings.NewReplacer("TABLE", s.table)
	s.claimSQL = r.Replace(claimSQL)
	s.extendSQL = r.Replace(extendSQL)
	s.completeSQL = r.Replace(completeSQL)
	s.releaseSQL = r.Replace(releaseSQL)
	s.getSQL = r.Replace(getSQL)
	s.deleteSQL = r.Replace(deleteSQL)
	s.sweepSQL = r.Replace(sweepSQL)
	s.takeOverSQL = r.Replace(takeOverSQL)
	s.insertSQL = r.Replace(insertSQL)
}

// Claim implements [idempotency.Store.Claim] with one statement; it sends
// it again only when it raced with a concurrent change to the same key.
func (s *Store) Claim(ctx context.Context, key, token string, lease time.Duration) (*idempotency.Record, error) {
	if err := checkText("key", key); err != nil {
		return nil, err
	}
	if err := checkText("token", token); err != nil {
		return nil, err
	}
	for range settleAttempts {
		var claimed bool
		var row recordRow
		err := s.pool.QueryRow(ctx, s.claimSQL, key, token, micros(lease)).Scan(
			&claimed, &row.version, &row.token, &row.state, &row.status,
			&row.header, &row.body, &row.fingerprint, &row.notStored, &row.remaining)
		if err != nil {
			return nil, fmt.Errorf("postgres: claim: %w", err)
		}
		if claimed {
			return nil, nil
		}
		if row.version == nil { // raced: see claimSQL
			continue
		}
		return row.record()
	}
	return nil, fmt.Errorf("postgres: claim: the key changed under %d attempts in a row", settleAttempts)
}

// Extend implements [idempotency.Store.Extend] with one UPDATE.
func (s *Store) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	tag, err := s.pool.Exec(ctx, s.extendSQL, key, token, micros(lease))
	if err != nil {
		return fmt.Errorf("postgres: extend: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return idempotency.ErrNotOwner
	}
	return nil
}

// Complete implements [idempotency.Store.Complete] with one statement; it
// sends it again only when it raced with a concurrent change to the same
// key. It panics if rec is nil.
func (s *Store) Complete(ctx context.Context, key, token string, rec *idempotency.Record, ttl time.Duration) error {
	if rec == nil {
		panic("postgres: Complete needs a non-nil record")
	}
	status, header, notStored, err := responseColumns(&rec.Response)
	if err != nil {
		return err
	}
	for range settleAttempts {
		var done bool
		var state *int16
		err := s.pool.QueryRow(ctx, s.completeSQL, key, token, status, header,
			rec.Response.Body, rec.Fingerprint, notStored, micros(ttl)).Scan(&done, &state)
		if err != nil {
			return fmt.Errorf("postgres: complete: %w", err)
		}
		switch {
		case done:
			return nil
		case state == nil:
			return idempotency.ErrNotOwner
		case *state == int16(idempotency.StateCompleted):
			return nil // a re-sent Complete: the record stays as it is
		}
		// In flight under token in the snapshot, yet not updated: the row
		// changed since. Look again.
	}
	return fmt.Errorf("postgres: complete: the key changed under %d attempts in a row", settleAttempts)
}

// Release implements [idempotency.Store.Release] with one DELETE.
func (s *Store) Release(ctx context.Context, key, token string) error {
	tag, err := s.pool.Exec(ctx, s.releaseSQL, key, token)
	if err != nil {
		return fmt.Errorf("postgres: release: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return idempotency.ErrNotOwner
	}
	return nil
}

// Get implements [idempotency.Store.Get] with one SELECT.
func (s *Store) Get(ctx context.Context, key string) (*idempotency.Record, error) {
	var row recordRow
	err := s.pool.QueryRow(ctx, s.getSQL, key).Scan(row.dest()...)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: get: %w", err)
	}
	return row.record()
}

// Delete implements [idempotency.Store.Delete] with one DELETE.
func (s *Store) Delete(ctx context.Context, key string) error {
	if _, err := s.pool.Exec(ctx, s.deleteSQL, key); err != nil {
		return fmt.Errorf("postgres: delete: %w", err)
	}
	return nil
}

// micros returns d in whole microseconds, at least 1, so that a lease or a
// TTL never ends before it begins.
func micros(d time.Duration) int64 {
	return max(d.Microseconds(), 1)
}

// checkText reports a string that a text column cannot hold: PostgreSQL
// text is valid UTF-8 without NUL. The middleware's keys and tokens are
// hexadecimal; this catches a custom caller's.
func checkText(what, s string) error {
	if !utf8.ValidString(s) || strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("postgres: the %s is not valid UTF-8 without NUL", what)
	}
	return nil
}
