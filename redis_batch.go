package idempotency

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisMaxBatch is the most claims sent in one pipeline.
const redisMaxBatch = 64

// WithClaimBatching lets concurrent claims share round trips: at most lanes
// claims, or batches of claims, are on their way to Redis at once, and the
// claims made while every lane is busy wait, then go out together as one
// pipeline (up to 64 claims) when a lane frees. Each is still its own
// script run, with its own reply. Under load this takes most of the system
// calls of a claim off both the service and Redis. Default: off, every
// claim is sent alone. It panics if lanes is not positive.
//
// It costs what a smaller connection pool would. While lanes claims are
// stuck (a connection that hangs, or a Cluster node that fails, for a
// pipeline waits for every node it touches), every other claim of the store
// waits for one of them, up to its own deadline; with one lane, which
// batches the most, one stuck claim holds them all.
//
// A batch runs on a context of its own, which lasts until the latest
// deadline among its claims: the values of a caller's context, such as a
// trace, do not reach the client's hooks, and those hooks run on a
// goroutine of the store (for Ring and Cluster, per-node hooks run on
// go-redis's own goroutines, where a panic ends the process). A panic in a
// hook that the store's goroutine runs fails the claims of that batch, as
// a store error (with FailOpen, their requests then run unprotected).
//
// A caller whose deadline passes while its claim waits gets the context's
// error, and the claim is not sent. A claim whose batch is already being
// sent may still be written after its caller gave up; like a claim whose
// reply is lost, it then holds the key for its lease.
func WithClaimBatching(lanes int) RedisOption {
	if lanes <= 0 {
		panic("idempotency: WithClaimBatching needs a positive number of lanes")
	}
	return func(o *redisOptions) { o.lanes = lanes }
}

// redisClaims sends the claims of a [RedisStore]: alone, or, with
// [WithClaimBatching], in batches once every lane is busy.
type redisClaims struct {
	lanes int // 0: every claim alone

	mu    sync.Mutex
	out   int               // lanes in use
	queue []*redisClaimCall // waiting for a lane
}

// redisClaimCall is one claim waiting in a [redisClaims] queue.
type redisClaimCall struct {
	key      string // with the store's prefix
	token    string
	lease    int64 // milliseconds
	deadline time.Time
	bounded  bool // deadline is set

	abandoned bool // the caller gave up; guarded by redisClaims.mu

	done  chan struct{} // closed once reply and err are set
	reply any
	err   error
}

// errRedisBatchEnded is the error of a claim whose batch ended without its
// reply: a client hook panicked or stopped the goroutine.
var errRedisBatchEnded = errors.New("idempotency: redis claim: the batch ended without a reply")

// run runs the claim script for key (with the prefix), token and lease
// (milliseconds), and returns its reply.
func (b *redisClaims) run(ctx context.Context, client redisClient, key, token string, lease int64) (any, error) {
	if b.lanes == 0 {
		return redisClaimScript.Run(ctx, client, []string{key}, token, lease).Result()
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b.mu.Lock()
	if b.out < b.lanes {
		b.out++
		b.mu.Unlock()
		defer b.next(client)
		return redisClaimScript.Run(ctx, client, []string{key}, token, lease).Result()
	}
	c := &redisClaimCall{key: key, token: token, lease: lease, done: make(chan struct{})}
	c.deadline, c.bounded = ctx.Deadline()
	b.queue = append(b.queue, c)
	b.mu.Unlock()
	select {
	case <-c.done:
		return c.reply, c.err
	case <-ctx.Done():
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-c.done:
		return c.reply, c.err // answered as the context ended: keep the answer
	default:
		c.abandoned = true
		return nil, ctx.Err()
	}
}

// next is called when a lane's round trip is over: the lane takes the next
// batch from the queue, or is freed.
func (b *redisClaims) next(client redisClient) {
	b.mu.Lock()
	batch := make([]*redisClaimCall, 0, min(len(b.queue), redisMaxBatch))
	taken := 0
	for _, c := range b.queue {
		if len(batch) == redisMaxBatch {
			break
		}
		taken++
		if !c.abandoned {
			batch = append(batch, c)
		}
	}
	clear(b.queue[:taken]) // let the calls taken, and their replies, go
	b.queue = b.queue[taken:]
	if len(b.queue) == 0 {
		b.queue = nil
	}
	if len(batch) == 0 {
		b.out--
		b.mu.Unlock()
		return
	}
	b.mu.Unlock()
	go b.send(client, batch)
	// Let the sender run now: a goroutine just started waits behind the
	// ones already runnable, and the queue with it.
	runtime.Gosched()
}

// send sends batch on the lane it holds, then passes the lane on. It runs
// next however it ends, runtime.Goexit in a hook included.
func (b *redisClaims) send(client redisClient, batch []*redisClaimCall) {
	defer b.next(client)
	b.sendBatch(client, batch)
}

// sendBatch sends batch as one pipeline and hands each claim its reply. The
// pipeline's context has the latest deadline of the claims in it, or none
// if one of them has none.
//
// Claims refused with NOSCRIPT (the server lost its scripts: a restart,
// SCRIPT FLUSH) were not applied: the script is loaded again and those not
// abandoned meanwhile are sent again, together, and, where the load did
// not reach their server (Ring loads on one shard), one by one.
func (b *redisClaims) sendBatch(client redisClient, batch []*redisClaimCall) {
	answered := 0
	defer func() {
		// Whatever happened in a client hook (a panic, recovered here so
		// that it does not end the process from a goroutine no request
		// runs; runtime.Goexit), the claims not answered yet fail.
		err := errRedisBatchEnded
		if p := recover(); p != nil {
			err = fmt.Errorf("idempotency: redis claim: panic in the redis client: %v", p)
		}
		for _, c := range batch[answered:] {
			c.err = err
			close(c.done)
		}
	}()

	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	var latest time.Time
	bounded := true
	for _, c := range batch {
		bounded = bounded && c.bounded
		if c.deadline.After(latest) {
			latest = c.deadline
		}
	}
	if bounded {
		ctx, cancel = context.WithDeadline(ctx, latest)
	}
	defer cancel()

	replies := make([]any, len(batch))
	errs := make([]error, len(batch))
	b.pipeline(ctx, client, batch, replies, errs, func(int) bool { return true })
	if slices.ContainsFunc(errs, redisIsNoScript) {
		if redisClaimScript.Load(ctx, client).Err() == nil {
			b.pipeline(ctx, client, batch, replies, errs, func(i int) bool { return redisIsNoScript(errs[i]) })
		}
		for i, c := range batch {
			if redisIsNoScript(errs[i]) && !b.isAbandoned(c) {
				replies[i], errs[i] = redisClaimScript.Run(ctx, client, []string{c.key}, c.token, c.lease).Result()
			}
		}
	}
	for i, c := range batch {
		c.reply, c.err = replies[i], errs[i]
		answered = i + 1
		close(c.done)
	}
}

// pipeline sends, as one pipeline, the claims of batch at the positions
// that want selects and that are neither abandoned nor past their
// deadline, and sets their replies.
func (b *redisClaims) pipeline(ctx context.Context, client redisClient, batch []*redisClaimCall, replies []any, errs []error, want func(int) bool) {
	pipe := client.Pipeline()
	cmds := make([]*redis.Cmd, len(batch))
	n := 0
	now := time.Now()
	for i, c := range batch {
		switch {
		case !want(i) || b.isAbandoned(c):
		case c.bounded && !now.Before(c.deadline):
			replies[i], errs[i] = nil, context.DeadlineExceeded
		default:
			cmds[i] = redisClaimScript.EvalSha(ctx, pipe, []string{c.key}, c.token, c.lease)
			n++
		}
	}
	if n == 0 {
		return
	}
	_, execErr := pipe.Exec(ctx)
	if execErr == nil {
		execErr = errRedisBatchEnded
	}
	for i, cmd := range cmds {
		if cmd == nil {
			continue
		}
		replies[i], errs[i] = cmd.Result()
		if replies[i] == nil && errs[i] == nil {
			// A command left with neither (a pipeline hook that refused
			// without sending): the claim script never replies nil, so
			// give the pipeline's own error.
			errs[i] = execErr
		}
	}
}

// isAbandoned reports whether c's caller gave up.
func (b *redisClaims) isAbandoned(c *redisClaimCall) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return c.abandoned
}

// redisIsNoScript reports whether err is the server's NOSCRIPT refusal.
func redisIsNoScript(err error) bool {
	return err != nil && redis.HasErrorPrefix(err, "NOSCRIPT")
}
