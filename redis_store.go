package idempotency

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"math"
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
// that touches only that key, or a plain DEL. Lease and TTL expiry are kept
// by Redis in milliseconds, so the clocks of the processes sharing it do not
// matter. A value the store cannot read (a record of a later version, say,
// during a rolling upgrade) is an error wrapping [ErrCorruptRecord], never
// an absent key.
//
// A RedisStore is safe for concurrent use by multiple goroutines and
// processes. Every call is bounded by its context only when the client
// honours context deadlines: build the client with ContextTimeoutEnabled
// set (see the README), or a Redis that accepts connections and never
// answers holds each call for the client's ReadTimeout.
type RedisStore struct {
	client redisClient
	prefix string
}

// redisClient is the part of a [redis.UniversalClient] that RedisStore
// uses: scripts and DEL.
type redisClient interface {
	redis.Scripter
	Del(ctx context.Context, keys ...string) *redis.IntCmd
}

var _ Store = (*RedisStore)(nil)

// RedisOption configures a [RedisStore].
type RedisOption func(*redisOptions)

type redisOptions struct {
	prefix string
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
	return &RedisStore{client: client, prefix: o.prefix}
}

// Claim implements [Store.Claim] with one script run.
func (s *RedisStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*Record, error) {
	if err := redisCheckToken(token); err != nil {
		return nil, err
	}
	v, err := redisClaimScript.Run(ctx, s.client, []string{s.prefix + key}, token, redisMillis(lease)).Result()
	if err != nil {
		return nil, fmt.Errorf("idempotency: redis claim: %w", err)
	}
	if _, claimed := v.(int64); claimed {
		return nil, nil
	}
	return redisDecodeReply(v)
}

// Extend implements [Store.Extend] with one script run.
func (s *RedisStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	n, err := redisExtendScript.Run(ctx, s.client, []string{s.prefix + key}, token, redisMillis(lease)).Int64()
	if err != nil {
		return fmt.Errorf("idempotency: redis extend: %w", err)
	}
	return redisOwnerResult(n)
}

// Complete implements [Store.Complete] with one script run. It panics if
// rec is nil.
func (s *RedisStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if rec == nil {
		panic("idempotency: Complete needs a non-nil record")
	}
	if err := redisCheckToken(token); err != nil {
		return err
	}
	value := encodeRecord(token, rec)
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

// redisDecodeReply decodes what the claim and get scripts return for a
// key that holds a value: the value, and the lease left in milliseconds
// (negative for a completed record).
func redisDecodeReply(v any) (*Record, error) {
	reply, ok := v.([]any)
	if !ok || len(reply) != 2 {
		return nil, fmt.Errorf("idempotency: redis store: unexpected script reply of type %T", v)
	}
	value, ok := reply[0].(string)
	lease, ok2 := reply[1].(int64)
	if !ok || !ok2 {
		return nil, fmt.Errorf("idempotency: redis store: unexpected script reply of types %T, %T", reply[0], reply[1])
	}
	rec, err := decodeRecord(value)
	if err != nil {
		return nil, err
	}
	if rec.State == StateInFlight && lease > 0 {
		rec.LeaseRemaining = time.Duration(min(lease, math.MaxInt64/int64(time.Millisecond))) * time.Millisecond
	}
	return rec, nil
}
