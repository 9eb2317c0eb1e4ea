package idempotency_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// The failover chaos test: three middleware instances, each with its own
// Sentinel failover client, share the master of the Sentinel setup while a
// load generator sends a few thousand requests over a few hundred keys,
// with duplicates sent at the same time to different instances and after
// random delays. It runs three phases, each printing a "chaos summary:"
// line:
//
//   - failover-acks: WithReplicaAcks(1, ...) and two SENTINEL FAILOVERs.
//     Asserted: no key runs twice, no two clients of one key get
//     different bodies, no 5xx but 503, and service resumes by itself.
//   - failover-no-acks: the same without the option. Printed only:
//     replication is asynchronous, and a failover may forget a claim.
//   - sigkill-acks: WithReplicaAcks(1, ...) and a SIGKILL of the master,
//     which Sentinel fails over; the killed server is restarted as a
//     replica of the new master. Printed only.
//
// It is gated by IDEMPOTENCY_CHAOS=1 and by the Sentinel setup's variables
// (see redis_acks_test.go):
//
//	IDEMPOTENCY_CHAOS=1 IDEMPOTENCY_REDIS_SENTINEL_ADDRS=... IDEMPOTENCY_REDIS_SENTINEL_MASTER=... \
//		go test -race -run '^TestChaosFailover$' -v .

const (
	failoverKeys       = 200
	failoverPerKey     = 8 // 3 sent together, 5 after random delays
	failoverSpread     = 18 * time.Second
	failoverKillSpread = 12 * time.Second
	failoverMaxDelay   = 3 * time.Second
	failoverLockTTL    = 20 * time.Second // longer than a failover leaves the master without a replica
	failoverStoreTO    = time.Second
	failoverAckTO      = 300 * time.Millisecond
	failoverFirstAt    = 1500 * time.Millisecond
	failoverMaxGap     = 15 * time.Second
	failoverSwitchWait = 20 * time.Second // for Sentinel to name a new master
	failoverWholeWait  = 30 * time.Second // for the old master to rejoin as a replica
)

// failoverPhase is one run of the load against the Sentinel setup.
type failoverPhase struct {
	name   string
	acks   bool
	kill   bool // SIGKILL the master once instead of two SENTINEL FAILOVERs
	assert bool
}

// failoverResult is what a phase counted.
type failoverResult struct {
	requests, executions, originals, replays, conflicts, unavailable int
	other5xx, otherStatus, requestErrs, leaseLost, twice, differing  int
	storeErrs                                                        int64
	failovers                                                        int
	switchTimes                                                      []time.Duration
	longestGap                                                       time.Duration
	elapsed                                                          time.Duration
}

func TestChaosFailover(t *testing.T) {
	if os.Getenv("IDEMPOTENCY_CHAOS") != "1" {
		t.Skip("failover chaos test skipped: set IDEMPOTENCY_CHAOS=1 and " + redisSentinelEnv + " to run it")
	}
	s := redisSentinel(t)
	phases := []failoverPhase{
		{name: "failover-acks", acks: true, assert: true},
		{name: "failover-no-acks"},
		{name: "sigkill-acks", acks: true, kill: true},
	}
	for _, ph := range phases {
		t.Run(ph.name, func(t *testing.T) {
			s.waitWhole(t, failoverWholeWait)
			r := failoverRun(t, s, ph)
			summary := fmt.Sprintf("chaos summary: phase=%s replica-acks=%v requests=%d executions=%d originals=%d replays=%d 409s=%d 503s=%d other-5xx=%d other-status=%d request-errors=%d lease-lost=%d keys-run-twice=%d keys-differing-bodies=%d store-errors=%d failovers=%d switch-times=%v longest-gap=%v elapsed=%v",
				ph.name, ph.acks, r.requests, r.executions, r.originals, r.replays, r.conflicts, r.unavailable, r.other5xx, r.otherStatus, r.requestErrs,
				r.leaseLost, r.twice, r.differing, r.storeErrs, r.failovers, r.switchTimes, r.longestGap.Round(time.Millisecond), r.elapsed.Round(time.Millisecond))
			t.Log(summary)
			fmt.Println(summary)
			// Every phase leaves the setup whole for what runs next.
			s.waitWhole(t, failoverWholeWait)
			if !ph.assert {
				return
			}
			assert.Zero(t, r.twice, "with WithReplicaAcks no key ran twice across the failovers")
			assert.Zero(t, r.differing, "with WithReplicaAcks no two clients of one key got different bodies")
			assert.Zero(t, r.other5xx, "no 5xx but 503")
			assert.Zero(t, r.otherStatus, "only 201, 409 and 503")
			assert.Zero(t, r.requestErrs, "every request was answered")
			assert.Equal(t, 2, r.failovers)
			assert.Less(t, r.longestGap, failoverMaxGap, "service resumed after each failover without a restart")
		})
	}
}

// failoverRun runs one phase and returns what it counted.
func failoverRun(t *testing.T, s *redisSentinelSetup, ph failoverPhase) failoverResult {
	start := time.Now()
	admin := s.client(t, nil)
	prefix := redisRandomPrefix(t, admin)
	rec := &chaosRecord{executions: map[string][]chaosExecution{}, leaseLost: map[string]int{}}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	seed := rng.Uint64()
	t.Logf("%s: seed %d", ph.name, seed)

	urls := make([]string, chaosInstances)
	for i := range chaosInstances {
		client := s.client(t, func(o *redis.FailoverOptions) {
			o.DialTimeout, o.ReadTimeout, o.WriteTimeout = failoverStoreTO, failoverStoreTO, failoverStoreTO
			o.PoolSize = 32
		})
		opts := []idempotency.RedisOption{idempotency.WithKeyPrefix(prefix)}
		if ph.acks {
			opts = append(opts, idempotency.WithReplicaAcks(1, failoverAckTO))
		}
		mw := idempotency.New(idempotency.Config{
			Store:        idempotency.NewRedisStore(client, opts...),
			LockTTL:      failoverLockTTL,
			StoreTimeout: failoverStoreTO,
			Observer: func(ev idempotency.Event) {
				if ev.Outcome == idempotency.OutcomeStoreError {
					rec.storeErrs.Add(1)
				}
				if ev.Outcome == idempotency.OutcomeLeaseLost || ev.Outcome == idempotency.OutcomeNotStored {
					rec.mu.Lock()
					rec.leaseLost[ev.StorageKey]++
					rec.mu.Unlock()
				}
			},
		})
		srv := httptest.NewServer(mw(failoverHandler(rec, i, seed)))
		t.Cleanup(srv.Close)
		urls[i] = srv.URL
	}

	spread := failoverSpread
	if ph.kill {
		spread = failoverKillSpread
	}
	var jobs []chaosJob
	for k := range failoverKeys {
		key := fmt.Sprintf("%s-%d-%d", ph.name, seed%100000, k)
		at0 := time.Duration(rng.Int64N(int64(spread)))
		for j := range failoverPerKey {
			at := at0
			if j >= chaosTogether {
				at += time.Duration(rng.Int64N(int64(failoverMaxDelay)))
			}
			jobs = append(jobs, chaosJob{key: key, instance: rng.IntN(chaosInstances), at: at})
		}
	}
	slices.SortFunc(jobs, func(a, b chaosJob) int { return int(a.at - b.at) })

	client := &http.Client{Timeout: chaosClientLimit, Transport: &http.Transport{MaxIdleConnsPerHost: chaosWorkers}}
	t.Cleanup(client.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(context.Background(), chaosTimeLimit)
	defer cancel()

	type timed struct {
		chaosOutcome
		at time.Time
	}
	queue := make(chan chaosJob)
	outcomes := make(chan timed, len(jobs))
	var workers sync.WaitGroup
	for range chaosWorkers {
		workers.Go(func() {
			for job := range queue {
				o := chaosSend(ctx, client, urls[job.instance], job)
				outcomes <- timed{o, time.Now()}
			}
		})
	}

	// The faults, on their own goroutine; failures are reported through
	// faultErr so that the load always finishes.
	loadStart := time.Now()
	var res failoverResult
	var faultErr error
	var faults sync.WaitGroup
	faults.Go(func() {
		sleepUntil(ctx, loadStart.Add(failoverFirstAt))
		if ph.kill {
			d, err := failoverKill(ctx, s)
			if err != nil {
				faultErr = err
				return
			}
			res.failovers++
			res.switchTimes = append(res.switchTimes, d.Round(time.Millisecond))
			return
		}
		for i := range 2 {
			if i > 0 {
				// The next failover needs the old master back as a replica.
				if err := failoverWaitWhole(ctx, s); err != nil {
					faultErr = err
					return
				}
			}
			d, err := failoverSentinel(ctx, s)
			if err != nil {
				faultErr = err
				return
			}
			res.failovers++
			res.switchTimes = append(res.switchTimes, d.Round(time.Millisecond))
		}
	})

dispatch:
	for _, job := range jobs {
		select {
		case <-time.After(time.Until(loadStart.Add(job.at))):
		case <-ctx.Done():
			break dispatch
		}
		select {
		case queue <- job:
		case <-ctx.Done():
			break dispatch
		}
	}
	close(queue)
	workers.Wait()
	faults.Wait()
	close(outcomes)
	require.NoError(t, faultErr, "the faults could not be injected")
	require.NoError(t, ctx.Err(), "the phase went past its time limit")

	// Service resumes by itself: each instance serves a fresh key (retried
	// on 503, as Retry-After invites), and the time of that success counts
	// in the longest gap.
	successes := []time.Time{loadStart}
	for i, url := range urls {
		key := fmt.Sprintf("%s-after-%d-%d", ph.name, seed%100000, i)
		deadline := time.Now().Add(failoverMaxGap + failoverWholeWait)
		for {
			o := chaosSend(context.Background(), client, url, chaosJob{key: key, instance: i})
			if o.err == nil && o.status == http.StatusCreated {
				successes = append(successes, time.Now())
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: instance %d never served again: %d %v", ph.name, i, o.status, o.err)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	rec.mu.Lock()
	executionsByKey, leaseLostByKey := rec.executions, rec.leaseLost
	rec.mu.Unlock()
	bodies := map[string]map[string]bool{}
	for o := range outcomes {
		res.requests++
		switch {
		case o.err != nil:
			res.requestErrs++
			t.Logf("%s: request for %s to instance %d: %v", ph.name, o.job.key, o.job.instance, o.err)
		case o.status == http.StatusCreated:
			successes = append(successes, o.at)
			if o.replayed {
				res.replays++
			} else {
				res.originals++
			}
			if bodies[o.job.key] == nil {
				bodies[o.job.key] = map[string]bool{}
			}
			bodies[o.job.key][o.body] = true
		case o.status == http.StatusConflict:
			res.conflicts++
			if ph.assert {
				assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemInProgress, o.ptype)
			}
		case o.status == http.StatusServiceUnavailable:
			res.unavailable++
			if ph.assert {
				assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemStoreUnavailable, o.ptype)
			}
		case o.status >= 500:
			res.other5xx++
			t.Logf("%s: %s: instance %d answered %d %s", ph.name, o.job.key, o.job.instance, o.status, o.body)
		default:
			res.otherStatus++
			t.Logf("%s: %s: instance %d answered %d %s", ph.name, o.job.key, o.job.instance, o.status, o.body)
		}
	}
	for _, bs := range bodies {
		if len(bs) > 1 {
			res.differing++
		}
	}
	for _, n := range leaseLostByKey {
		res.leaseLost += n
	}
	for key, execs := range executionsByKey {
		res.executions += len(execs)
		if len(execs) > 1 {
			res.twice++
			t.Logf("%s: %s ran %d times (lease-lost reports: %d)", ph.name, key, len(execs), leaseLostByKey[idempotency.StorageKey("", key)])
		}
	}
	slices.SortFunc(successes, func(a, b time.Time) int { return a.Compare(b) })
	for i := 1; i < len(successes); i++ {
		res.longestGap = max(res.longestGap, successes[i].Sub(successes[i-1]))
	}
	res.storeErrs = rec.storeErrs.Load()
	res.elapsed = time.Since(start)
	return res
}

// failoverHandler is the chaos handler: it records each execution, and
// instance 0 is slow.
func failoverHandler(rec *chaosRecord, instance int, seed uint64) http.Handler {
	rng := rand.New(rand.NewPCG(seed, uint64(instance)))
	var mu sync.Mutex
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, _ := idempotency.KeyFromContext(r.Context())
		n := rec.seq.Add(1)
		body := fmt.Sprintf(`{"key":%q,"execution":%d,"instance":%d}`, key, n, instance)
		rec.mu.Lock()
		rec.executions[key] = append(rec.executions[key], chaosExecution{key: key, instance: instance, body: body})
		rec.mu.Unlock()
		if instance == 0 {
			mu.Lock()
			d := chaosSlowMin + time.Duration(rng.Int64N(int64(chaosSlowMax-chaosSlowMin)))
			mu.Unlock()
			select {
			case <-time.After(d):
			case <-r.Context().Done():
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, body)
	})
}

// sleepUntil sleeps until t or until ctx is done.
func sleepUntil(ctx context.Context, t time.Time) {
	select {
	case <-time.After(time.Until(t)):
	case <-ctx.Done():
	}
}

// failoverSentinel asks a Sentinel for a failover and returns how long
// the Sentinels took to name the new master.
func failoverSentinel(ctx context.Context, s *redisSentinelSetup) (time.Duration, error) {
	old, err := s.masterAddr(ctx)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	err = s.sentinelCall(ctx, func(sc *redis.SentinelClient) error { return sc.Failover(ctx, s.master).Err() })
	if err != nil {
		return 0, fmt.Errorf("SENTINEL FAILOVER: %w", err)
	}
	if err := failoverAwaitSwitch(ctx, s, old); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// failoverKill kills the master with SIGKILL, waits for the Sentinels to
// name a new one, and restarts the killed server as its replica. It
// returns how long the Sentinels took.
func failoverKill(ctx context.Context, s *redisSentinelSetup) (time.Duration, error) {
	old, err := s.masterAddr(ctx)
	if err != nil {
		return 0, err
	}
	info, err := redisNodeInfo(ctx, old, "server")
	if err != nil {
		return 0, err
	}
	var pid int
	if _, err := fmt.Sscan(info["process_id"], &pid); err != nil {
		return 0, fmt.Errorf("process_id of %s: %w", old, err)
	}
	conf := info["config_file"]
	if conf == "" {
		return 0, fmt.Errorf("%s runs without a config file: cannot restart it", old)
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return 0, err
	}
	if err := failoverAwaitSwitch(ctx, s, old); err != nil {
		return 0, err
	}
	took := time.Since(start)
	master, err := s.masterAddr(ctx)
	if err != nil {
		return 0, err
	}
	host, port, _ := net.SplitHostPort(master)
	// The config file daemonizes the server: the command returns once it
	// forked.
	if out, err := exec.CommandContext(ctx, bin, conf, "--replicaof", host, port).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("restarting %s: %w: %s", old, err, out)
	}
	return took, nil
}

// failoverAwaitSwitch waits until the Sentinels name a master other than
// old.
func failoverAwaitSwitch(ctx context.Context, s *redisSentinelSetup, old string) error {
	deadline := time.Now().Add(failoverSwitchWait)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if addr, err := s.masterAddr(ctx); err == nil && addr != old {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("the Sentinels did not replace master %s within %v", old, failoverSwitchWait)
}

// failoverWaitWhole waits until the setup is whole again.
func failoverWaitWhole(ctx context.Context, s *redisSentinelSetup) error {
	deadline := time.Now().Add(failoverWholeWait)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, _, err := s.whole(cctx)
		cancel()
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
