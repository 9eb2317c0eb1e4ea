package idempotency

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// The scripts of the Redis store. Each touches exactly one key, KEYS[1], so
// they run unchanged on Redis Cluster. redis.Script runs them with EVALSHA
// and falls back to EVAL when the server does not have them cached yet.
var (
	//go:embed redis_record.lua
	redisRecordLua string
	//go:embed redis_claim.lua
	redisClaimLua string
	//go:embed redis_extend.lua
	redisExtendLua string
	//go:embed redis_complete.lua
	redisCompleteLua string
	//go:embed redis_release.lua
	redisReleaseLua string
	//go:embed redis_get.lua
	redisGetLua string

	redisClaimScript    = redis.NewScript(redisRecordLua + redisClaimLua)
	redisExtendScript   = redis.NewScript(redisRecordLua + redisExtendLua)
	redisCompleteScript = redis.NewScript(redisRecordLua + redisCompleteLua)
	redisReleaseScript  = redis.NewScript(redisRecordLua + redisReleaseLua)
	redisGetScript      = redis.NewScript(redisRecordLua + redisGetLua)
)

// redisDefaultKeyPrefix is the key prefix of a RedisStore built without
// [WithKeyPrefix].
const redisDefaultKeyPrefix = "idempotency:"

// RedisStore is a [Store] kept in Redis through go-redis v9, for services
// that run as several processes. It works with every
// [redis.UniversalClient]: a single server (*redis.Client), Sentinel
// (redis.NewFailoverClient), Redis Cluster (*redis.ClusterClient) and
// *redis.Ring.
//
// Each record is one Redis key, the key prefix followed by the key the
// middleware passes, and each operation is one round trip: a Lua script
// that touches only that key, or a plain command ([WithClaimBatching] lets
// concurrent claims share round trips). Lease and TTL expiry are
// kept by Redis in milliseconds, so the clocks of the processes sharing it
// do not matter.
//
// A RedisStore is safe for concurrent use by multiple goroutines and
// processes. Every call is bounded by its context only when the client
// honours context deadlines: build the client with ContextTimeoutEnabled
// set (see the README), or a Redis that accepts connections and never
// answers holds each call for the client's ReadTimeout.
type RedisStore struct {
	client redisClient
	prefix string
	claims redisClaims
}

// redisClient is the part of a [redis.UniversalClient] that RedisStore
// uses: scripts, DEL, and pipelines for batched claims.
type redisClient interface {
	redis.Scripter
	Del(ctx context.Context, keys ...string) *redis.IntCmd
	Pipeline() redis.Pipeliner
}

var _ Store = (*RedisStore)(nil)

// RedisOption configures a [RedisStore].
type RedisOption func(*redisOptions)

type redisOptions struct {
	prefix string
	lanes  int
}

// WithKeyPrefix sets the prefix of the Redis keys that hold records; the
// key of a record is the prefix followed by the 64 hexadecimal digits of
// the storage key. Use a distinct prefix for each middleware that shares a
// Redis. The default is "idempotency:".
func WithKeyPrefix(prefix string) RedisOption {
	return func(o *redisOptions) { o.prefix = prefix }
}

// NewRedisStore returns a store that keeps its records in Redis through
// client. It does no I/O: the first operation reaches Redis. It panics if
// client is nil.
func NewRedisStore(client redis.UniversalClient, opts ...RedisOption) *RedisStore {
	if client == nil {
		panic("idempotency: NewRedisStore needs a non-nil redis client")
	}
	o := redisOptions{prefix: redisDefaultKeyPrefix}
	for _, opt := range opts {
		opt(&o)
	}
	return &RedisStore{client: client, prefix: o.prefix, claims: redisClaims{lanes: o.lanes}}
}

// Claim implements [Store.Claim] with one script run.
func (s *RedisStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*Record, error) {
	rec, enc, err := s.claimEncoded(ctx, key, token, lease)
	if enc != "" {
		return decodeRecord(enc)
	}
	return rec, err
}

// claimEncoded implements encodedStore: Claim, returning a completed record
// as its encoding, unchecked (the caller reads it with viewRecord).
func (s *RedisStore) claimEncoded(ctx context.Context, key, token string, lease time.Duration) (*Record, string, error) {
	if err := redisCheckToken(token); err != nil {
		return nil, "", err
	}
	v, err := s.claims.run(ctx, s.client, s.prefix+key, token, redisMillis(lease))
	if err != nil {
		return nil, "", fmt.Errorf("idempotency: redis claim: %w", err)
	}
	if _, claimed := v.(int64); claimed {
		return nil, "", nil
	}
	enc, ok := v.(string)
	if !ok {
		return nil, "", fmt.Errorf("idempotency: redis store: unexpected script reply of type %T", v)
	}
	if len(enc) >= recordHeaderLen && State(enc[1]) == StateCompleted {
		return nil, enc, nil
	}
	rec, err := decodeRecord(enc)
	return rec, "", err
}

// Extend implements [Store.Extend] with one script run.
func (s *RedisStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	n, err := redisExtendScript.Run(ctx, s.client, []string{s.prefix + key}, token, redisMillis(lease)).Int64()
	if err != nil {
		return fmt.Errorf("idempotency: redis extend: %w", err)
	}
	return redisOwnerResult(n)
}

// Complete implements [Store.Complete] with one script run.
func (s *RedisStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if err := redisCheckToken(token); err != nil {
		return err
	}
	return s.complete(ctx, key, token, encodeRecord(token, rec), ttl)
}

// completeEncoded implements encodedStore: Complete for a record the
// middleware encoded.
func (s *RedisStore) completeEncoded(ctx context.Context, key, token string, enc []byte, ttl time.Duration) error {
	if err := redisCheckToken(token); err != nil {
		return err
	}
	return s.complete(ctx, key, token, enc, ttl)
}

// complete runs the complete script with value, a string or a byte slice.
func (s *RedisStore) complete(ctx context.Context, key, token string, value any, ttl time.Duration) error {
	n, err := redisCompleteScript.Run(ctx, s.client, []string{s.prefix + key}, token, value, redisMillis(ttl)).Int64()
	if err != nil {
		return fmt.Errorf("idempotency: redis complete: %w", err)
	}
	return redisOwnerResult(n)
}

// Release implements [Store.Release] with one script run.
func (s *RedisStore) Release(ctx context.Context, key, token string) error {
	n, err := redisReleaseScript.Run(ctx, s.client, []string{s.prefix + key}, token).Int64()
	if err != nil {
		return fmt.Errorf("idempotency: redis release: %w", err)
	}
	return redisOwnerResult(n)
}

// Get implements [Store.Get] with one script run, which also reads the
// lease of an in-flight record.
func (s *RedisStore) Get(ctx context.Context, key string) (*Record, error) {
	v, err := redisGetScript.Run(ctx, s.client, []string{s.prefix + key}).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("idempotency: redis get: %w", err)
	}
	return redisDecodeReply(v)
}

// Delete implements [Store.Delete] with one DEL.
func (s *RedisStore) Delete(ctx context.Context, key string) error {
	if err := s.client.Del(ctx, s.prefix+key).Err(); err != nil {
		return fmt.Errorf("idempotency: redis delete: %w", err)
	}
	return nil
}

// redisMillis returns d in whole milliseconds, at least 1: Redis refuses a
// PX or PEXPIRE of 0.
func redisMillis(d time.Duration) int64 {
	return max(d.Milliseconds(), 1)
}

// redisCheckToken reports a token the record header cannot hold.
func redisCheckToken(token string) error {
	if len(token) > recordMaxTokenLen {
		return fmt.Errorf("idempotency: redis store: token of %d bytes is longer than %d", len(token), recordMaxTokenLen)
	}
	return nil
}

// redisOwnerResult maps the reply of the owner-checked scripts to an error.
func redisOwnerResult(n int64) error {
	switch n {
	case 1:
		return nil
	case 0:
		return ErrNotOwner
	}
	return fmt.Errorf("%w: not a record of a known version", ErrCorruptRecord)
}

// redisDecodeReply decodes a record the claim and get scripts returned.
func redisDecodeReply(v any) (*Record, error) {
	s, ok := v.(string)
	if !ok {
		return nil, fmt.Errorf("idempotency: redis store: unexpected script reply of type %T", v)
	}
	return decodeRecord(s)
}
