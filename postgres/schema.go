package postgres

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
)

// schemaVersion is the version of the table layout that Schema creates. It
// is kept in the table's comment, after schemaMarker, where Migrate reads
// it.
const (
	schemaVersion = 1
	schemaMarker  = "github.com/f8e778d0/idempotency/postgres schema "
)

// migrateLockKey is the advisory lock Migrate holds while it looks at the
// catalog and creates the table: a fixed number, so that instances
// starting together create the table once. It is the first 64 bits of the
// SHA-256 of "github.com/f8e778d0/idempotency/postgres.Migrate", shifted
// right by one to stay positive: any fixed value would do, and this one is
// unlikely to be another application's.
const migrateLockKey int64 = 0x1fa7254db7b34942

// Limits of the table name: PostgreSQL names hold 63 bytes, and the index
// name is the table's name followed by indexSuffix.
const (
	maxNameLen  = 63
	indexSuffix = "_expires_at_idx"
	maxTableLen = maxNameLen - len(indexSuffix)
)

// quoteTable validates name ("table" or "schema.table") and returns it
// quoted, and the quoted name of its expiry index.
func quoteTable(name string) (table, index string, err error) {
	parts := strings.Split(name, ".")
	if len(parts) > 2 {
		return "", "", fmt.Errorf("table name %q has more than one dot", name)
	}
	for i, p := range parts {
		limit := maxNameLen
		if i == len(parts)-1 {
			limit = maxTableLen
		}
		switch {
		case p == "":
			return "", "", fmt.Errorf("table name %q has an empty part", name)
		case len(p) > limit:
			return "", "", fmt.Errorf("table name %q: %q is longer than %d bytes", name, p, limit)
		case !utf8.ValidString(p) || strings.IndexByte(p, 0) >= 0:
			return "", "", fmt.Errorf("table name %q is not valid UTF-8 without NUL", name)
		}
	}
	return pgx.Identifier(parts).Sanitize(), pgx.Identifier{parts[len(parts)-1] + indexSuffix}.Sanitize(), nil
}

// Schema returns the DDL that creates the store's table, its index on the
// expiry column and the comment that records the schema version, for a
// migration tool. Every statement is idempotent (IF NOT EXISTS). The table:
//
//	key          text PRIMARY KEY  the storage key the middleware passes
//	version      smallint          the row format; rows of an unknown
//	                               version are refused, never misread
//	token        text              the owner token of the claim
//	state        smallint          1 in flight, 2 completed
//	status       integer           the response status (completed rows)
//	header       bytea             the response header, see below
//	body         bytea             the response body
//	fingerprint  bytea             the request fingerprint
//	not_stored   text              why the response was not kept, or NULL
//	expires_at   timestamptz       end of the lease or of the TTL
//
// The header column holds the names in sorted order, each followed by its
// values in order; every count and length is an unsigned varint, every
// string its length then its bytes. It is bytea rather than jsonb because
// header values may hold bytes that are not UTF-8.
func (s *Store) Schema() string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %[1]s (
	key         text        PRIMARY KEY,
	version     smallint    NOT NULL,
	token       text        NOT NULL,
	state       smallint    NOT NULL,
	status      integer,
	header      bytea,
	body        bytea,
	fingerprint bytea,
	not_stored  text,
	expires_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS %[2]s ON %[1]s (expires_at);
COMMENT ON TABLE %[1]s IS '%[3]s%[4]d';
`, s.table, s.index, schemaMarker, schemaVersion)
}

// Migrate creates the store's table and index (the DDL of [Store.Schema])
// when they are missing, in one transaction. It is safe to call from
// several instances at once: they take turns on a transaction-scoped
// advisory lock on a fixed key, and all but the first find the table made.
// A table of the right name that has no schema version in its comment is
// left alone and reported as an error: it is not this package's.
func (s *Store) Migrate(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", migrateLockKey); err != nil {
			return fmt.Errorf("postgres: migrate: advisory lock: %w", err)
		}
		var exists bool
		var comment *string
		err := tx.QueryRow(ctx,
			"SELECT to_regclass($1) IS NOT NULL, obj_description(to_regclass($1), 'pg_class')",
			s.table).Scan(&exists, &comment)
		if err != nil {
			return fmt.Errorf("postgres: migrate: %w", err)
		}
		if exists {
			version, ok := commentVersion(comment)
			if !ok {
				return fmt.Errorf("postgres: migrate: table %s exists without the schema comment of this package", s.name)
			}
			if version >= schemaVersion {
				return nil
			}
		}
		if _, err := tx.Exec(ctx, s.Schema()); err != nil {
			return fmt.Errorf("postgres: migrate: %w", err)
		}
		return nil
	})
}

// commentVersion reads the schema version from a table comment.
func commentVersion(comment *string) (int, bool) {
	if comment == nil {
		return 0, false
	}
	rest, ok := strings.CutPrefix(*comment, schemaMarker)
	if !ok {
		return 0, false
	}
	v, err := strconv.Atoi(rest)
	return v, err == nil && v > 0
}

// defaultSweepBatch is the batch size Sweep uses when given none.
const defaultSweepBatch = 1000

// Sweep deletes expired rows, at most limit in each statement, until a
// batch finds fewer than limit, and returns how many it deleted. Each batch
// is its own short transaction that skips rows other transactions hold, so
// Sweep can run beside live traffic and from several instances at once. A
// limit of zero or less means 1000. Expired rows are already invisible to
// the store; Sweep only gives their space back. When ctx ends between
// batches, Sweep returns what it deleted so far and ctx's error.
func (s *Store) Sweep(ctx context.Context, limit int) (int, error) {
	if limit <= 0 {
		limit = defaultSweepBatch
	}
	total := 0
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		tag, err := s.pool.Exec(ctx, s.sweepSQL, limit)
		if err != nil {
			return total, fmt.Errorf("postgres: sweep: %w", err)
		}
		n := int(tag.RowsAffected())
		total += n
		if n < limit {
			return total, nil
		}
	}
}
