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
	acks   *redisAcks // nil without WithReplicaAcks
}

// redisAcks is what WithReplicaAcks set, with the way to reach the master
// of a key.
type redisAcks struct {
	n       int
	timeout time.Duration
	// master returns the client of the server that holds key as master:
	// a pipeline on it runs on one connection to that server.
	master func(ctx context.Context, key string) (*redis.Client, error)
	// cluster is the Cluster client, told to reload its slot map when a
	// node answers MOVED or ASK; nil on other topologies.
	cluster *redis.ClusterClient
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
	prefix     string
	acks       int
	ackTimeout time.Duration
}

// ErrReplicaAcks is returned, wrapped, by a [RedisStore] built with
// [WithReplicaAcks] when a claim, extension or completion was applied on
// the master but fewer replicas than asked acknowledged it in time. The
// master was reachable, so it is not an outage: the middleware answers
// such a claim 503 even when Config.FailOpen is set, and retries an
// extension or completion while the lease lasts.
var ErrReplicaAcks = errors.New("idempotency: too few replicas acknowledged the write")

// WithKeyPrefix sets the prefix of the Redis keys that hold records; the
// key of a record is the prefix followed by the 64 hexadecimal digits of
// the storage key. Use a distinct prefix for each middleware that shares a
// Redis. The default is "idempotency:".
func WithKeyPrefix(prefix string) RedisOption {
	return func(o *redisOptions) { o.prefix = prefix }
}

// WithReplicaAcks makes every claim, extension and completion wait until
// at least n replicas of the key's master hold it, for at most timeout: a
// WAIT pipelined right behind the script, on the same connection to the
// key's own master (the node that owns the key's slot on Redis Cluster,
// the key's shard on a Ring), so each operation stays one round trip.
// Fewer acknowledgements make the call fail with an error wrapping
// [ErrReplicaAcks]: the middleware answers such a claim 503 (the claim is
// released first, so the retry need not wait out the lease) and retries
// an extension or completion while the lease lasts. Release, Get and
// Delete do not wait.
//
// With it, a Sentinel or Cluster failover to a replica that acknowledged
// does not forget a claim or a stored response the middleware acted on.
// Replication stays asynchronous: WAIT does not make a write durable on
// the replica's disk, and a write that timed out may still be applied on
// the master and replicated later. See the Redis documentation of WAIT
// and the server's min-replicas-to-write setting, its companion.
//
// The timeout must be shorter than Config.StoreTimeout, which New checks.
// WithReplicaAcks panics unless n >= 1 and timeout > 0, and NewRedisStore
// panics when the client is not a *redis.Client (which includes the
// Sentinel failover client), *redis.ClusterClient or *redis.Ring.
func WithReplicaAcks(n int, timeout time.Duration) RedisOption {
	if n < 1 {
		panic(fmt.Sprintf("idempotency: WithReplicaAcks needs at least 1 replica, not %d", n))
	}
	if timeout <= 0 {
		panic("idempotency: WithReplicaAcks timeout must be positive")
	}
	return func(o *redisOptions) { o.acks, o.ackTimeout = n, timeout }
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
	s := &RedisStore{client: client, prefix: o.prefix}
	if o.acks > 0 {
		s.acks = &redisAcks{n: o.acks, timeout: o.ackTimeout}
		switch c := client.(type) {
		case *redis.Client:
			s.acks.master = func(context.Context, string) (*redis.Client, error) { return c, nil }
		case *redis.ClusterClient:
			s.acks.master, s.acks.cluster = c.MasterForKey, c
		case *redis.Ring:
			s.acks.master = func(_ context.Context, key string) (*redis.Client, error) { return c.GetShardClientForKey(key) }
		default:
			panic(fmt.Sprintf("idempotency: WithReplicaAcks needs a *redis.Client, *redis.ClusterClient or *redis.Ring, not %T", client))
		}
	}
	return s
}

// checkStoreTimeout panics when the store cannot finish a call within
// storeTimeout, the middleware's StoreTimeout: the WithReplicaAcks timeout
// must leave room for the round trip.
func (s *RedisStore) checkStoreTimeout(storeTimeout time.Duration) {
	if s.acks != nil && s.acks.timeout >= storeTimeout {
		panic(fmt.Sprintf("idempotency: the WithReplicaAcks timeout (%v) must be shorter than StoreTimeout (%v)", s.acks.timeout, storeTimeout))
	}
}

// Claim implements [Store.Claim] with one script run (and, with
// [WithReplicaAcks], its WAIT in the same round trip).
func (s *RedisStore) Claim(ctx context.Context, key, token string, lease time.Duration) (*Record, error) {
	if err := redisCheckToken(token); err != nil {
		return nil, err
	}
	v, acked, err := s.run(ctx, redisClaimScript, s.prefix+key, token, redisMillis(lease))
	if err != nil {
		return nil, fmt.Errorf("idempotency: redis claim: %w", err)
	}
	if _, claimed := v.(int64); claimed {
		if err := s.checkAcks(acked); err != nil {
			// Nobody acts on this claim: free the key at once rather than
			// have the client's retry wait out the lease.
			_ = s.Release(ctx, key, token)
			return nil, fmt.Errorf("idempotency: redis claim: %w", err)
		}
		return nil, nil
	}
	// Nothing was written: the WAIT count says nothing about this record.
	return redisDecodeReply(v)
}

// Extend implements [Store.Extend] with one script run (and, with
// [WithReplicaAcks], its WAIT in the same round trip).
func (s *RedisStore) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	v, acked, err := s.run(ctx, redisExtendScript, s.prefix+key, token, redisMillis(lease))
	if err != nil {
		return fmt.Errorf("idempotency: redis extend: %w", err)
	}
	if err := redisOwnerReply(v); err != nil {
		return err
	}
	if err := s.checkAcks(acked); err != nil {
		return fmt.Errorf("idempotency: redis extend: %w", err)
	}
	return nil
}

// Complete implements [Store.Complete] with one script run (and, with
// [WithReplicaAcks], its WAIT in the same round trip). It panics if rec is
// nil.
func (s *RedisStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if rec == nil {
		panic("idempotency: Complete needs a non-nil record")
	}
	if err := redisCheckToken(token); err != nil {
		return err
	}
	value := encodeRecord(token, rec)
	v, acked, err := s.run(ctx, redisCompleteScript, s.prefix+key, token, value, redisMillis(ttl))
	if err != nil {
		return fmt.Errorf("idempotency: redis complete: %w", err)
	}
	if err := redisOwnerReply(v); err != nil {
		return err
	}
	if err := s.checkAcks(acked); err != nil {
		return fmt.Errorf("idempotency: redis complete: %w", err)
	}
	return nil
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

// run runs script on the record key rkey and returns its reply. With
// [WithReplicaAcks] it also returns how many replicas acknowledged the
// writes made so far on the connection (-1 without the option): the
// script and a WAIT go in one pipeline to the key's master. The count
// means something only when the script wrote; every script that reports
// success has written, so a repeated call is covered too.
func (s *RedisStore) run(ctx context.Context, script *redis.Script, rkey string, args ...any) (any, int64, error) {
	keys := []string{rkey}
	if s.acks == nil {
		v, err := script.Run(ctx, s.client, keys, args...).Result()
		return v, -1, err
	}
	master, err := s.acks.master(ctx, rkey)
	if err != nil {
		return nil, 0, err
	}
	v, acked, err := s.runAcked(ctx, master, func(p redis.Pipeliner) *redis.Cmd {
		return script.EvalSha(ctx, p, keys, args...)
	})
	if redis.HasErrorPrefix(err, "NOSCRIPT") {
		// That server's script cache does not have it (a restart, a
		// failover, SCRIPT FLUSH): EVAL caches it and does the work.
		v, acked, err = s.runAcked(ctx, master, func(p redis.Pipeliner) *redis.Cmd {
			return script.Eval(ctx, p, keys, args...)
		})
	}
	if s.acks.cluster != nil {
		_, moved := redis.IsMovedError(err)
		_, ask := redis.IsAskError(err)
		if moved || ask {
			// The slot map is stale: the next call goes to the right node.
			s.acks.cluster.ReloadState(ctx)
		}
	}
	return v, acked, err
}

// runAcked sends the script command that queue adds and a WAIT in one
// pipeline on master. The script's own reply is checked first: a failed
// script makes the WAIT count meaningless.
func (s *RedisStore) runAcked(ctx context.Context, master *redis.Client, queue func(redis.Pipeliner) *redis.Cmd) (any, int64, error) {
	var eval *redis.Cmd
	var wait *redis.Cmd
	_, _ = master.Pipelined(ctx, func(p redis.Pipeliner) error {
		eval = queue(p)
		wait = p.Do(ctx, "WAIT", s.acks.n, redisMillis(s.acks.timeout))
		return nil
	})
	v, err := eval.Result()
	if err != nil {
		return nil, 0, err
	}
	acked, err := wait.Int64()
	if err != nil {
		return nil, 0, fmt.Errorf("WAIT: %w", err)
	}
	return v, acked, nil
}

// checkAcks returns an error wrapping ErrReplicaAcks when acked, a WAIT
// count from run, is short of what WithReplicaAcks asks.
func (s *RedisStore) checkAcks(acked int64) error {
	if s.acks == nil || acked >= int64(s.acks.n) {
		return nil
	}
	return fmt.Errorf("%w: %d of %d within %v", ErrReplicaAcks, acked, s.acks.n, s.acks.timeout)
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

// redisOwnerReply is redisOwnerResult of a script reply that should be an
// integer.
func redisOwnerReply(v any) error {
	n, ok := v.(int64)
	if !ok {
		return fmt.Errorf("idempotency: redis store: unexpected script reply of type %T", v)
	}
	return redisOwnerResult(n)
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
