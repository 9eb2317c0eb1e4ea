package idempotency

import (
	"context"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
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
// that touches only that key, or a plain command. Lease and TTL expiry are
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
}

// redisClient is the part of a [redis.UniversalClient] that RedisStore
// uses: scripts, and DEL.
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

// Complete implements [Store.Complete] with one script run.
func (s *RedisStore) Complete(ctx context.Context, key, token string, rec *Record, ttl time.Duration) error {
	if err := redisCheckToken(token); err != nil {
		return err
	}
	value := redisEncodeRecord(token, rec)
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
	if len(token) > redisMaxTokenLen {
		return fmt.Errorf("idempotency: redis store: token of %d bytes is longer than %d", len(token), redisMaxTokenLen)
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
	return redisDecodeRecord(s)
}

// The record encoding, version 1. Every value starts with a fixed header
// that the scripts read without decoding the rest:
//
//	version   1 byte, redisRecordVersion
//	state     1 byte, StateInFlight or StateCompleted
//	token     1 byte length n, then n bytes
//
// An in-flight record ends there. A completed record goes on with its
// payload, where every number is an unsigned varint and every string or
// byte slice is its varint length followed by its bytes:
//
//	status code
//	not-stored reason
//	header names count, header values count (all names together)
//	per name: name, values count, values (in order)
//	fingerprint
//	body, which ends the value
//
// The strings come before the byte slices, so that a decoder can copy the
// fingerprint and the body into one slice.
const (
	redisRecordVersion = 1
	redisHeaderLen     = 3
	redisMaxTokenLen   = 255
)

// redisEncodeRecord encodes rec, completed by token, in one allocation.
func redisEncodeRecord(token string, rec *Record) string {
	r := &rec.Response
	nValues := 0
	size := redisHeaderLen + len(token) +
		redisUvarintLen(uint64(r.StatusCode)) +
		redisBytesLen(len(r.NotStored)) +
		redisUvarintLen(uint64(len(r.Header)))
	for name, values := range r.Header {
		nValues += len(values)
		size += redisBytesLen(len(name)) + redisUvarintLen(uint64(len(values)))
		for _, v := range values {
			size += redisBytesLen(len(v))
		}
	}
	size += redisUvarintLen(uint64(nValues)) +
		redisBytesLen(len(rec.Fingerprint)) +
		redisBytesLen(len(r.Body))

	var b strings.Builder
	b.Grow(size)
	b.WriteByte(redisRecordVersion)
	b.WriteByte(byte(StateCompleted))
	b.WriteByte(byte(len(token)))
	b.WriteString(token)
	redisWriteUvarint(&b, uint64(r.StatusCode))
	redisWriteString(&b, r.NotStored)
	redisWriteUvarint(&b, uint64(len(r.Header)))
	redisWriteUvarint(&b, uint64(nValues))
	for name, values := range r.Header {
		redisWriteString(&b, name)
		redisWriteUvarint(&b, uint64(len(values)))
		for _, v := range values {
			redisWriteString(&b, v)
		}
	}
	redisWriteUvarint(&b, uint64(len(rec.Fingerprint)))
	b.Write(rec.Fingerprint)
	redisWriteUvarint(&b, uint64(len(r.Body)))
	b.Write(r.Body)
	return b.String()
}

func redisWriteUvarint(b *strings.Builder, x uint64) {
	var buf [binary.MaxVarintLen64]byte
	b.Write(binary.AppendUvarint(buf[:0], x))
}

func redisWriteString(b *strings.Builder, s string) {
	redisWriteUvarint(b, uint64(len(s)))
	b.WriteString(s)
}

func redisUvarintLen(x uint64) int {
	n := 1
	for x >= 0x80 {
		x >>= 7
		n++
	}
	return n
}

func redisBytesLen(n int) int {
	return redisUvarintLen(uint64(n)) + n
}

// redisDecodeRecord decodes a record as the claim and get scripts return
// it: the value, followed for an in-flight record by its remaining lease in
// milliseconds, in decimal. Every error wraps ErrCorruptRecord.
//
// It allocates the record, the header map, one slice for all header
// values, and one byte slice that the fingerprint and the body share; the
// strings of the record are substrings of v.
func redisDecodeRecord(v string) (*Record, error) {
	if len(v) < redisHeaderLen {
		return nil, redisCorrupt("value of %d bytes is shorter than the record header", len(v))
	}
	if v[0] != redisRecordVersion {
		return nil, redisCorrupt("unknown version %d", v[0])
	}
	state := State(v[1])
	tokenEnd := redisHeaderLen + int(v[2])
	if tokenEnd > len(v) {
		return nil, redisCorrupt("truncated token")
	}
	switch state {
	case StateInFlight:
		// The script appended the lease; a PTTL of -1 (no expiry, which
		// this store never sets) reads as "cannot tell".
		rest := v[tokenEnd:]
		ms, err := strconv.ParseInt(rest, 10, 64)
		if err != nil || ms > int64(math.MaxInt64/time.Millisecond) {
			return nil, redisCorrupt("in-flight record followed by %d bytes that are not its lease", len(rest))
		}
		rec := &Record{State: StateInFlight, Token: v[redisHeaderLen:tokenEnd]}
		if ms > 0 {
			rec.LeaseRemaining = time.Duration(ms) * time.Millisecond
		}
		return rec, nil
	case StateCompleted:
		return redisDecodeCompleted(v, tokenEnd)
	}
	return nil, redisCorrupt("unknown state %d", v[1])
}

// redisDecodeCompleted decodes the payload of a completed record v whose
// token ends at tokenEnd.
func redisDecodeCompleted(v string, tokenEnd int) (*Record, error) {
	d := redisDecoder{s: v, off: tokenEnd}
	status := d.uvarint()
	notStoredStart, notStoredEnd := d.span()
	nNames := d.uvarint()
	nValues := d.uvarint()
	if d.err != nil {
		return nil, d.err
	}
	// Every name and value takes at least one byte: counts larger than
	// what is left are corrupt, and must not size an allocation.
	if nNames > uint64(len(v)-d.off) || nValues > uint64(len(v)-d.off) ||
		status > 999 || (status < 200 && status != http.StatusSwitchingProtocols) {
		return nil, redisCorrupt("implausible counts")
	}

	// First pass: validate the header section and find where it ends.
	headerStart := d.off
	var seen uint64
	for range nNames {
		d.span()
		n := d.uvarint()
		if d.err == nil && n > uint64(len(v)-d.off) {
			return nil, redisCorrupt("implausible counts")
		}
		for range n {
			if d.span(); d.err != nil {
				return nil, d.err
			}
		}
		seen += n
		if d.err != nil {
			return nil, d.err
		}
	}
	if seen != nValues {
		return nil, redisCorrupt("header value count mismatch")
	}
	fpStart, fpEnd := d.span()
	bodyStart, bodyEnd := d.span()
	if d.err != nil {
		return nil, d.err
	}
	if bodyEnd != len(v) {
		return nil, redisCorrupt("%d bytes after the body", len(v)-bodyEnd)
	}

	// The token, the not-stored reason and the header names and values
	// are substrings of v, which the record keeps alive while it lives.
	rec := &Record{
		State: StateCompleted,
		Token: v[redisHeaderLen:tokenEnd],
		Response: Response{
			StatusCode: int(status),
			NotStored:  v[notStoredStart:notStoredEnd],
		},
	}
	if nNames > 0 {
		h := make(http.Header, nNames)
		all := make([]string, nValues)
		d.off = headerStart
		for range nNames {
			ns, ne := d.span()
			n := int(d.uvarint())
			values := all[:n:n]
			all = all[n:]
			for i := range values {
				vs, ve := d.span()
				values[i] = v[vs:ve]
			}
			h[v[ns:ne]] = values
		}
		rec.Response.Header = h
	}
	if n := bodyEnd - fpStart; fpEnd > fpStart || bodyEnd > bodyStart {
		// One slice for the fingerprint and the body, without the body's
		// length prefix between them.
		buf := make([]byte, 0, n)
		buf = append(buf, v[fpStart:fpEnd]...)
		buf = append(buf, v[bodyStart:bodyEnd]...)
		fpLen := fpEnd - fpStart
		if fpLen > 0 {
			rec.Fingerprint = buf[:fpLen:fpLen]
		}
		if len(buf) > fpLen {
			rec.Response.Body = buf[fpLen:]
		}
	}
	return rec, nil
}

// redisDecoder reads varints and length-prefixed spans from s; the first
// error sticks and makes every later read return zero.
type redisDecoder struct {
	s   string
	off int
	err error
}

func (d *redisDecoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	var x uint64
	for shift := uint(0); shift < 64; shift += 7 {
		if d.off >= len(d.s) {
			d.err = redisCorrupt("truncated value")
			return 0
		}
		c := d.s[d.off]
		d.off++
		if c < 0x80 {
			return x | uint64(c)<<shift
		}
		x |= uint64(c&0x7f) << shift
	}
	d.err = redisCorrupt("varint overflows")
	return 0
}

// span reads a length and returns the offsets of the bytes it announces.
func (d *redisDecoder) span() (start, end int) {
	n := d.uvarint()
	if d.err != nil {
		return d.off, d.off
	}
	if n > uint64(len(d.s)-d.off) {
		d.err = redisCorrupt("truncated value")
		return d.off, d.off
	}
	start = d.off
	d.off += int(n)
	return start, d.off
}

func redisCorrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorruptRecord, fmt.Sprintf(format, args...))
}
