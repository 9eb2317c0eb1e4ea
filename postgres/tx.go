package postgres

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/f8e778d0/idempotency"
)

// DefaultMaxTxDuration is how long a request's transaction may last in the
// one-transaction mode when [WithMaxTxDuration] is not given.
const DefaultMaxTxDuration = time.Minute

// ErrManagedTx is returned by Commit and Rollback of the transaction that
// [Tx] returns: the middleware ends it, with the response.
var ErrManagedTx = errors.New("postgres: the middleware commits or rolls back this transaction")

// Transactional makes the store run every covered request with a key in a
// transaction of its own, the one-transaction mode: the handler's writes,
// made through [Tx], and the stored response commit together or not at
// all. See the package documentation.
func Transactional() Option {
	return func(o *options) { o.tx = true }
}

// WithTxOptions sets the options of the transactions of [Transactional]:
// the isolation level (READ COMMITTED when IsoLevel is empty, whatever the
// server's default), the deferrable mode, or a BeginQuery of your own.
// NewStore panics on a read-only access mode (the record could not be
// written) and on a CommitQuery (the store sends COMMIT itself, with the
// record).
func WithTxOptions(opts pgx.TxOptions) Option {
	return func(o *options) { o.txOptions = opts }
}

// WithMaxTxDuration bounds a transaction of [Transactional], from its
// begin to its commit: the handler's context ends at that deadline, even
// when the client hangs up earlier, and a handler that returns after it
// has its transaction rolled back (503). The default is
// [DefaultMaxTxDuration]. NewStore panics if d is not positive.
func WithMaxTxDuration(d time.Duration) Option {
	return func(o *options) { o.maxTx = d }
}

// Transactional reports whether s was built with [Transactional]. It makes
// Store an [idempotency.TxStore].
func (s *Store) Transactional() bool { return s.tx }

var _ idempotency.TxStore = (*Store)(nil)

// The statements of the one-transaction mode, with TABLE standing for the
// quoted table name.
const (
	// lockSQL takes the advisory lock $1 for the rest of the transaction,
	// or reports that another transaction holds it.
	lockSQL = `SELECT pg_try_advisory_xact_lock($1)`

	// takeOverSQL deletes $1 if it has expired, so that insertSQL can
	// insert it.
	takeOverSQL = `DELETE FROM TABLE WHERE key = $1 AND expires_at <= clock_timestamp()`

	// insertSQL stores the completed record of $1: status $2, header $3,
	// body $4, fingerprint $5 and not-stored reason $6, kept for $7
	// microseconds. A live row under $1 makes it fail with a unique
	// violation, which aborts the transaction. The row is completed when
	// it becomes visible, and no lease names it: its token is "tx".
	insertSQL = `INSERT INTO TABLE (key, version, token, state, status, header, body, fingerprint, not_stored, expires_at)
VALUES ($1, 1, 'tx', 2, $2, $3, $4, $5, $6, clock_timestamp() + $7::bigint * interval '1 microsecond')`
)

// lockKey returns the advisory lock that stands for key in s's table. It
// hashes the table's name without its schema, so that instances that name
// the table with and without it take the same lock.
func (s *Store) lockKey(key string) int64 {
	sum := sha256.Sum256([]byte(s.tableName() + "\x00" + key))
	return int64(binary.BigEndian.Uint64(sum[:8]))
}

// tableName returns the name of s's table without its schema.
func (s *Store) tableName() string {
	return s.name[strings.LastIndexByte(s.name, '.')+1:]
}

// Begin implements [idempotency.TxStore.Begin]. It takes a connection from
// the pool, then sends in one round trip the BEGIN, a try-lock of the
// advisory lock that stands for key, and, as a statement of its own after
// the lock, the look-up of key's record. A completed record is returned
// even when another transaction holds the lock (a replay of the same key,
// say); a record still in flight under a lease (a store on the same table
// without Transactional) is reported as busy.
func (s *Store) Begin(ctx context.Context, key string) (idempotency.StoreTx, *idempotency.Record, error) {
	if !s.tx {
		return nil, nil, errors.New("postgres: Begin needs a store built with Transactional")
	}
	if err := checkText("key", key); err != nil {
		return nil, nil, err
	}
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("postgres: begin: pool exhausted: no connection free within the store timeout: %w", err)
		}
		return nil, nil, fmt.Errorf("postgres: begin: acquire a connection: %w", err)
	}
	b := &pgx.Batch{}
	b.BeginTx(s.txOptions)
	b.Queue(lockSQL, s.lockKey(key))
	b.Queue(s.getSQL, key)
	br := conn.SendBatch(ctx, b)
	t := &txn{conn: conn, tx: br.Tx(), deadline: time.Now().Add(s.maxTx), store: s, key: key}

	var locked, found bool
	var row recordRow
	_, err = br.Exec()
	if err == nil {
		err = br.QueryRow().Scan(&locked)
	}
	if err == nil {
		err = br.QueryRow().Scan(row.dest()...)
		found = err == nil
		if errors.Is(err, pgx.ErrNoRows) {
			err = nil
		}
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	switch {
	case err != nil:
		return t, nil, fmt.Errorf("postgres: begin: %w", err)
	case !found && !locked:
		return t, nil, idempotency.ErrKeyBusy
	case !found:
		return t, nil, nil
	}
	// A completed record is committed, and so final: it is replayed
	// whether or not this transaction got the lock, which another replay
	// may hold for a moment.
	rec, err := row.record()
	switch {
	case err != nil:
		return t, nil, err
	case rec.State == idempotency.StateInFlight:
		return t, nil, idempotency.ErrKeyBusy
	}
	return t, rec, nil
}

// txn is a request's transaction: an [idempotency.StoreTx].
type txn struct {
	conn     *pgxpool.Conn // nil once given back
	tx       pgx.Tx
	deadline time.Time
	cancel   context.CancelFunc // of the handler's context, once made
	store    *Store
	key      string

	mu      sync.Mutex
	retried error // the first serialisation failure or deadlock a handler's statement met

	ended atomic.Bool // the connection went back to the pool: the handler's Tx is closed
}

// txKey is the context key under which a txn's handlerTx travels.
type txKey struct{}

// Context implements [idempotency.StoreTx.Context]: the handler's context
// carries the transaction for [Tx], and it does not end when ctx is
// cancelled (the client hanging up), only at the transaction's deadline.
func (t *txn) Context(ctx context.Context) context.Context {
	ctx, t.cancel = context.WithDeadline(context.WithoutCancel(ctx), t.deadline)
	return context.WithValue(ctx, txKey{}, handlerTx{Tx: t.tx, t: t, managed: true})
}

// note keeps err if it is the first serialisation failure or deadlock of
// t's statements, and returns it.
func (t *txn) note(err error) error {
	if retryable(err) {
		t.mu.Lock()
		if t.retried == nil {
			t.retried = err
		}
		t.mu.Unlock()
	}
	return err
}

// retryable reports whether err is a serialisation failure or a deadlock:
// the server rolled the transaction back, and the request may be retried.
func retryable(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == "40001" || pgErr.Code == "40P01")
}

// Aborted implements [idempotency.StoreTx.Aborted]: a statement failed, the
// connection broke, or the transaction was ended by hand (a raw COMMIT).
// A transaction that a serialisation failure or a deadlock aborted, or
// that ran past its deadline, is not reported: Commit refuses it with
// ErrNotCommitted, so that the client gets 503 and retries.
func (t *txn) Aborted() bool {
	if t.conn == nil {
		return true
	}
	if t.retriedBy() != nil || !time.Now().Before(t.deadline) {
		return false
	}
	return t.broken()
}

// retriedBy returns the serialisation failure or deadlock that a handler's
// statement met, if any.
func (t *txn) retriedBy() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.retried
}

// broken reports whether t can no longer commit.
func (t *txn) broken() bool {
	pc := t.conn.Conn().PgConn()
	return pc.IsClosed() || pc.TxStatus() != 'T'
}

// Commit implements [idempotency.StoreTx.Commit]. It sends in one round
// trip the removal of an expired row under the key, the insert of rec and
// COMMIT. A live row under the key fails the insert, which aborts the
// transaction: Commit then rolls back and returns that row.
func (t *txn) Commit(ctx context.Context, rec *idempotency.Record, ttl time.Duration) (*idempotency.Record, error) {
	if t.conn == nil {
		return nil, fmt.Errorf("%w: the transaction has ended", idempotency.ErrNotCommitted)
	}
	if !time.Now().Before(t.deadline) {
		return nil, fmt.Errorf("%w: the transaction ran past its maximum duration of %v",
			idempotency.ErrNotCommitted, t.store.maxTx)
	}
	if retried := t.retriedBy(); retried != nil && t.broken() {
		return nil, fmt.Errorf("%w: rolled back by the database: %w", idempotency.ErrNotCommitted, retried)
	}
	status, header, notStored, err := responseColumns(&rec.Response)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", idempotency.ErrNotCommitted, err)
	}
	s := t.store
	b := &pgx.Batch{}
	b.Queue(s.takeOverSQL, t.key)
	b.Queue(s.insertSQL, t.key, status, header, rec.Response.Body, rec.Fingerprint, notStored, micros(ttl))
	b.Queue("COMMIT")
	br := t.conn.SendBatch(ctx, b)
	_, err = br.Exec()
	if err == nil {
		_, err = br.Exec()
	}
	var tag pgconn.CommandTag
	if err == nil {
		tag, err = br.Exec()
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}

	var pgErr *pgconn.PgError
	switch {
	case err == nil && tag.String() == "COMMIT":
		t.release()
		return nil, nil
	case err == nil:
		// The transaction was aborted before the batch: COMMIT rolled it
		// back.
		t.release()
		return nil, fmt.Errorf("%w: COMMIT answered %q", idempotency.ErrNotCommitted, tag.String())
	case errors.As(err, &pgErr) && pgErr.Code == "23505" && pgErr.TableName == s.tableName():
		// Another transaction completed the key first, under a snapshot
		// that hid its row from Begin.
		return t.liveRecord(ctx)
	case retryable(err):
		return nil, fmt.Errorf("%w: rolled back by the database: %w", idempotency.ErrNotCommitted, err)
	case errors.As(err, &pgErr):
		return nil, fmt.Errorf("%w: rolled back: %w", idempotency.ErrNotCommitted, err)
	case pgconn.SafeToRetry(err):
		return nil, fmt.Errorf("%w: COMMIT not sent: %w", idempotency.ErrNotCommitted, err)
	}
	return nil, fmt.Errorf("%w: COMMIT sent, outcome unknown: %w", idempotency.ErrNotCommitted, err)
}

// liveRecord rolls t back and returns the live record under its key.
func (t *txn) liveRecord(ctx context.Context) (*idempotency.Record, error) {
	err := t.tx.Rollback(ctx)
	t.release()
	if err != nil {
		return nil, fmt.Errorf("%w: rollback after a unique violation: %w", idempotency.ErrNotCommitted, err)
	}
	rec, err := t.store.Get(ctx, t.key)
	if rec == nil && err == nil {
		err = errors.New("it expired in between")
	}
	if err != nil {
		return nil, fmt.Errorf("%w: reading the record another request stored: %w", idempotency.ErrNotCommitted, err)
	}
	return rec, nil
}

// Rollback implements [idempotency.StoreTx.Rollback]. On a broken
// connection there is nothing to roll back: the server did when it lost
// the connection.
func (t *txn) Rollback(ctx context.Context) error {
	if t.conn == nil {
		return nil
	}
	defer t.release()
	if t.conn.Conn().PgConn().IsClosed() {
		return nil
	}
	if err := t.tx.Rollback(ctx); err != nil && !errors.Is(err, pgx.ErrTxClosed) {
		return fmt.Errorf("postgres: rollback: %w", err)
	}
	return nil
}

// release gives t's connection back to the pool, which closes it if it is
// still in a transaction, and ends the handler's context.
func (t *txn) release() {
	t.ended.Store(true)
	if t.cancel != nil {
		t.cancel()
	}
	t.conn.Release()
	t.conn = nil
}

// Tx returns the transaction of the request whose context is ctx, in the
// one-transaction mode ([Transactional]); nil outside it. The handler's
// statements made through it commit with the stored response, or not at
// all. Its Commit and Rollback return [ErrManagedTx]; its Begin starts a
// savepoint, which the handler may release or roll back. A serialisation
// failure or a deadlock that aborts the transaction (one that no savepoint
// caught) makes the request's answer 503 with Retry-After, whatever below
// 500 the handler answers, since the retry may well succeed. It is closed
// once the handler has returned: do not use it from a goroutine that
// outlives the handler (its methods then return [pgx.ErrTxClosed]).
func Tx(ctx context.Context) pgx.Tx {
	tx, _ := ctx.Value(txKey{}).(pgx.Tx)
	return tx
}

// handlerTx is the transaction as the handler sees it: the middleware's
// own, which the handler may not end (managed), or a savepoint in it. It
// notes a serialisation failure or a deadlock that a statement meets, so
// that the request is answered 503 rather than 500.
type handlerTx struct {
	pgx.Tx
	t       *txn
	managed bool
}

func (h handlerTx) Commit(ctx context.Context) error {
	if h.t.ended.Load() {
		return pgx.ErrTxClosed
	}
	if h.managed {
		return ErrManagedTx
	}
	return h.t.note(h.Tx.Commit(ctx))
}

func (h handlerTx) Rollback(ctx context.Context) error {
	if h.t.ended.Load() {
		return pgx.ErrTxClosed
	}
	if h.managed {
		return ErrManagedTx
	}
	return h.t.note(h.Tx.Rollback(ctx))
}

func (h handlerTx) Begin(ctx context.Context) (pgx.Tx, error) {
	if h.t.ended.Load() {
		return nil, pgx.ErrTxClosed
	}
	sp, err := h.Tx.Begin(ctx)
	if err != nil {
		return nil, h.t.note(err)
	}
	return handlerTx{Tx: sp, t: h.t}, nil
}

func (h handlerTx) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	if h.t.ended.Load() {
		return pgconn.CommandTag{}, pgx.ErrTxClosed
	}
	tag, err := h.Tx.Exec(ctx, sql, args...)
	return tag, h.t.note(err)
}

func (h handlerTx) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	if h.t.ended.Load() {
		return nil, pgx.ErrTxClosed
	}
	rows, err := h.Tx.Query(ctx, sql, args...)
	if err != nil {
		return rows, h.t.note(err)
	}
	return notedRows{rows, h.t}, nil
}

func (h handlerTx) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if h.t.ended.Load() {
		return closedRow{}
	}
	return notedRow{h.Tx.QueryRow(ctx, sql, args...), h.t}
}

func (h handlerTx) SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	if h.t.ended.Load() {
		return pgx.FailedBatchResults(b, pgx.ErrTxClosed)
	}
	return notedBatch{h.Tx.SendBatch(ctx, b), h.t}
}

func (h handlerTx) CopyFrom(ctx context.Context, table pgx.Identifier, columns []string, src pgx.CopyFromSource) (int64, error) {
	if h.t.ended.Load() {
		return 0, pgx.ErrTxClosed
	}
	n, err := h.Tx.CopyFrom(ctx, table, columns, src)
	return n, h.t.note(err)
}

// notedRows, notedRow and notedBatch note the errors of what handlerTx
// returns.
type notedRows struct {
	pgx.Rows
	t *txn
}

func (r notedRows) Err() error { return r.t.note(r.Rows.Err()) }

func (r notedRows) Close() {
	r.Rows.Close()
	r.t.note(r.Rows.Err())
}

// closedRow is the row of a query on a closed transaction.
type closedRow struct{}

func (closedRow) Scan(...any) error { return pgx.ErrTxClosed }

type notedRow struct {
	pgx.Row
	t *txn
}

func (r notedRow) Scan(dest ...any) error { return r.t.note(r.Row.Scan(dest...)) }

type notedBatch struct {
	pgx.BatchResults
	t *txn
}

func (b notedBatch) Exec() (pgconn.CommandTag, error) {
	tag, err := b.BatchResults.Exec()
	return tag, b.t.note(err)
}

func (b notedBatch) Query() (pgx.Rows, error) {
	rows, err := b.BatchResults.Query()
	if err != nil {
		return rows, b.t.note(err)
	}
	return notedRows{rows, b.t}, nil
}

func (b notedBatch) QueryRow() pgx.Row { return notedRow{b.BatchResults.QueryRow(), b.t} }

func (b notedBatch) Close() error { return b.t.note(b.BatchResults.Close()) }
