package idempotency_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// The chaos test: several middleware instances share a Redis that is
// killed (SIGKILL) and restarted twice while a load generator sends a few
// thousand requests over a few hundred keys, with duplicates sent at the
// same time to different instances and after random delays, and one
// instance is slow. Redis runs with appendonly yes and appendfsync always,
// so a kill loses no acknowledged write; what the test checks is that the
// middleware turns every failure into a 409 or a 503 and never into a
// second execution, a 500 or someone else's body.
//
// It starts its own redis-server on a free loopback port and is gated by
// IDEMPOTENCY_CHAOS=1:
//
//	IDEMPOTENCY_CHAOS=1 go test -race -run '^TestChaos$' -v .

const (
	chaosInstances   = 3
	chaosKeys        = 300
	chaosPerKey      = 10 // 3 sent together, 7 after random delays
	chaosTogether    = 3
	chaosSpread      = 6 * time.Second // when each key's first requests start
	chaosMaxDelay    = 3 * time.Second // how late a delayed duplicate comes
	chaosLockTTL     = 2 * time.Second
	chaosStoreTO     = 250 * time.Millisecond
	chaosWorkers     = 48
	chaosTimeLimit   = 60 * time.Second
	chaosSlowMin     = 300 * time.Millisecond // the slow instance's handler
	chaosSlowMax     = 1500 * time.Millisecond
	chaosRestartGap  = 400 * time.Millisecond // how long Redis stays dead
	chaosClientLimit = 15 * time.Second
)

// chaosRedis is a redis-server process the test owns.
type chaosRedis struct {
	t    *testing.T
	bin  string
	port string
	dir  string
	log  *os.File

	mu  sync.Mutex
	cmd *exec.Cmd
}

// chaosFreePort returns a loopback port nobody listens on right now.
func chaosFreePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	_, port, err := net.SplitHostPort(l.Addr().String())
	require.NoError(t, err)
	require.NoError(t, l.Close())
	return port
}

func chaosStartRedis(t *testing.T) *chaosRedis {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	require.NoError(t, err, "IDEMPOTENCY_CHAOS=1 needs redis-server on PATH")
	dir := t.TempDir()
	log, err := os.Create(filepath.Join(dir, "redis.log"))
	require.NoError(t, err)
	r := &chaosRedis{t: t, bin: bin, port: chaosFreePort(t), dir: dir, log: log}
	t.Cleanup(func() {
		r.kill()
		_ = log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("redis-server log:\n%s", b)
		}
	})
	r.start()
	return r
}

func (r *chaosRedis) addr() string { return net.JoinHostPort("127.0.0.1", r.port) }

// start runs redis-server and waits until it answers PING.
func (r *chaosRedis) start() {
	r.t.Helper()
	cmd := exec.Command(r.bin,
		"--port", r.port, "--bind", "127.0.0.1",
		"--appendonly", "yes", "--appendfsync", "always",
		"--save", "", "--dir", r.dir, "--daemonize", "no")
	cmd.Stdout, cmd.Stderr = r.log, r.log
	require.NoError(r.t, cmd.Start())
	r.mu.Lock()
	r.cmd = cmd
	r.mu.Unlock()

	c := redis.NewClient(&redis.Options{Addr: r.addr(), MaxRetries: -1, DialTimeout: 100 * time.Millisecond})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			require.NoError(r.t, err, "redis-server did not come up on %s", r.addr())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill sends SIGKILL and reaps the process.
func (r *chaosRedis) kill() {
	r.mu.Lock()
	cmd := r.cmd
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	_ = cmd.Wait()
}

// chaosExecution is one run of the handler.
type chaosExecution struct {
	key      string
	instance int
	body     string
}

// chaosRecord is what the test records, shared by all instances.
type chaosRecord struct {
	mu         sync.Mutex
	executions map[string][]chaosExecution // by client key
	leaseLost  map[string]int              // lease lost or completion given up, by storage key
	seq        atomic.Int64
	storeErrs  atomic.Int64
}

// chaosJob is one request of the load.
type chaosJob struct {
	key      string
	instance int
	at       time.Duration // since the start of the load
}

// chaosOutcome is what one client got.
type chaosOutcome struct {
	job      chaosJob
	status   int
	replayed bool
	body     string
	ptype    string
	err      error
}

func TestChaos(t *testing.T) {
	if os.Getenv("IDEMPOTENCY_CHAOS") != "1" {
		t.Skip("chaos test skipped: set IDEMPOTENCY_CHAOS=1 to run it (it starts its own redis-server)")
	}
	faultNoLeak(t)
	testStart := time.Now()
	rds := chaosStartRedis(t)
	rec := &chaosRecord{executions: map[string][]chaosExecution{}, leaseLost: map[string]int{}}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 6))
	seed := rng.Uint64()
	t.Logf("chaos: redis on %s, seed %d", rds.addr(), seed)

	// The middleware instances, each with its own client, as separate
	// processes would have.
	urls := make([]string, chaosInstances)
	for i := range chaosInstances {
		client := redis.NewClient(&redis.Options{
			Addr:                  rds.addr(),
			ContextTimeoutEnabled: true,
			DialTimeout:           chaosStoreTO,
			ReadTimeout:           chaosStoreTO,
			WriteTimeout:          chaosStoreTO,
			PoolSize:              32,
		})
		t.Cleanup(func() { _ = client.Close() })
		slow := i == 0
		instance := i
		handlerRng := rand.New(rand.NewPCG(seed, uint64(i)))
		var rngMu sync.Mutex
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			key, _ := idempotency.KeyFromContext(r.Context())
			n := rec.seq.Add(1)
			body := fmt.Sprintf(`{"key":%q,"execution":%d,"instance":%d}`, key, n, instance)
			rec.mu.Lock()
			rec.executions[key] = append(rec.executions[key], chaosExecution{key: key, instance: instance, body: body})
			rec.mu.Unlock()
			if slow {
				rngMu.Lock()
				d := chaosSlowMin + time.Duration(handlerRng.Int64N(int64(chaosSlowMax-chaosSlowMin)))
				rngMu.Unlock()
				select {
				case <-time.After(d):
				case <-r.Context().Done():
					// The lease was lost (or the client left): stop before
					// the side effect, as a careful handler does.
				}
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, body)
		})
		mw := idempotency.New(idempotency.Config{
			Store:        idempotency.NewRedisStore(client, idempotency.WithKeyPrefix("chaos:")),
			LockTTL:      chaosLockTTL,
			StoreTimeout: chaosStoreTO,
			Observer: func(ev idempotency.Event) {
				if ev.Outcome == idempotency.OutcomeStoreError {
					rec.storeErrs.Add(1)
				}
				// A completion given up when the store stayed away past
				// the lease is reported as a lost lease or as a response
				// not stored (nothing else is too large or hijacked here):
				// either way the key may run again.
				if ev.Outcome == idempotency.OutcomeLeaseLost || ev.Outcome == idempotency.OutcomeNotStored {
					rec.mu.Lock()
					rec.leaseLost[ev.StorageKey]++
					rec.mu.Unlock()
				}
			},
		})
		srv := httptest.NewServer(mw(h))
		t.Cleanup(srv.Close)
		urls[i] = srv.URL
	}

	// The load: per key, a few requests at once to different instances,
	// then duplicates after random delays.
	var jobs []chaosJob
	for k := range chaosKeys {
		key := fmt.Sprintf("chaos-%d-%d", seed%100000, k)
		start := time.Duration(rng.Int64N(int64(chaosSpread)))
		for j := range chaosPerKey {
			at := start
			if j >= chaosTogether {
				at += time.Duration(rng.Int64N(int64(chaosMaxDelay)))
			}
			jobs = append(jobs, chaosJob{key: key, instance: rng.IntN(chaosInstances), at: at})
		}
	}
	slices.SortFunc(jobs, func(a, b chaosJob) int { return int(a.at - b.at) })
	loadEnd := jobs[len(jobs)-1].at

	client := &http.Client{
		Timeout:   chaosClientLimit,
		Transport: &http.Transport{MaxIdleConnsPerHost: chaosWorkers},
	}
	t.Cleanup(client.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(context.Background(), chaosTimeLimit)
	defer cancel()

	queue := make(chan chaosJob)
	outcomes := make(chan chaosOutcome, len(jobs))
	var workers sync.WaitGroup
	for range chaosWorkers {
		workers.Go(func() {
			for job := range queue {
				outcomes <- chaosSend(ctx, client, urls[job.instance], job)
			}
		})
	}

	// Kill Redis twice during the load, and bring it back each time on the
	// same port, with the same data directory.
	var chaosDone sync.WaitGroup
	kills := []time.Duration{loadEnd / 4, loadEnd * 3 / 5}
	loadStart := time.Now()
	chaosDone.Go(func() {
		for i, at := range kills {
			select {
			case <-time.After(time.Until(loadStart.Add(at))):
			case <-ctx.Done():
				return
			}
			rds.kill()
			downAt := time.Now()
			time.Sleep(chaosRestartGap)
			rds.start()
			t.Logf("chaos: redis killed at %v and back after %v (restart %d)", at.Round(time.Millisecond), time.Since(downAt).Round(time.Millisecond), i+1)
		}
	})

	// Dispatch the jobs on schedule.
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
	chaosDone.Wait()
	close(outcomes)
	require.NoError(t, ctx.Err(), "the chaos run went past its time limit")

	// Every client got the original response, its exact replay, a 409 or
	// a 503.
	rec.mu.Lock()
	executionsByKey, leaseLostByKey := rec.executions, rec.leaseLost
	rec.executions, rec.leaseLost = map[string][]chaosExecution{}, map[string]int{}
	rec.mu.Unlock()
	var requests, originals, replays, conflicts, unavailable int
	for o := range outcomes {
		requests++
		if !assert.NoError(t, o.err, "request for %s to instance %d", o.job.key, o.job.instance) {
			continue
		}
		execs := executionsByKey[o.job.key]
		switch {
		case o.status == http.StatusCreated && !o.replayed:
			originals++
			assert.True(t, slices.ContainsFunc(execs, func(e chaosExecution) bool { return e.body == o.body }),
				"%s: an original response that no execution wrote: %s", o.job.key, o.body)
		case o.status == http.StatusCreated && o.replayed:
			replays++
			assert.True(t, slices.ContainsFunc(execs, func(e chaosExecution) bool { return e.body == o.body }),
				"%s: a replay of a body no execution of this key wrote: %s", o.job.key, o.body)
		case o.status == http.StatusConflict:
			conflicts++
			assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemInProgress, o.ptype)
		case o.status == http.StatusServiceUnavailable:
			unavailable++
			assert.Equal(t, "https://github.com/f8e778d0/idempotency#"+idempotency.ProblemStoreUnavailable, o.ptype)
		default:
			t.Errorf("%s: instance %d answered %d %s", o.job.key, o.job.instance, o.status, o.body)
		}
	}
	assert.Equal(t, len(jobs), requests)

	// No key ran twice unless the observer reported its lease lost.
	executions, leaseLost, twice := 0, 0, 0
	for _, n := range leaseLostByKey {
		leaseLost += n
	}
	for key, execs := range executionsByKey {
		executions += len(execs)
		if len(execs) > 1 {
			twice++
			assert.Positive(t, leaseLostByKey[idempotency.StorageKey("", key)],
				"%s ran %d times without a lease-lost report: %v", key, len(execs), execs)
		}
	}

	// All instances serve normally after the last restart.
	for i, url := range urls {
		key := fmt.Sprintf("chaos-after-%d-%d", seed%100000, i)
		first := chaosSend(context.Background(), client, url, chaosJob{key: key, instance: i})
		require.NoError(t, first.err)
		assert.Equal(t, http.StatusCreated, first.status, "instance %d after the restarts", i)
		other := (i + 1) % chaosInstances
		again := chaosSend(context.Background(), client, urls[other], chaosJob{key: key, instance: other})
		require.NoError(t, again.err)
		assert.True(t, again.replayed, "instance %d replays what instance %d stored", other, i)
		assert.Equal(t, first.body, again.body)
	}

	summary := fmt.Sprintf("chaos summary: requests=%d executions=%d originals=%d replays=%d 409s=%d 503s=%d lease-lost=%d keys-run-twice=%d store-errors=%d redis-kills=%d elapsed=%v",
		requests, executions, originals, replays, conflicts, unavailable, leaseLost, twice, rec.storeErrs.Load(), len(kills), time.Since(testStart).Round(time.Millisecond))
	t.Log(summary)
	fmt.Println(summary)
}

// chaosSend sends job's request and classifies the answer.
func chaosSend(ctx context.Context, client *http.Client, url string, job chaosJob) chaosOutcome {
	o := chaosOutcome{job: job}
	body := `{"order":"` + job.key + `"}`
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/orders", strings.NewReader(body))
	if err != nil {
		o.err = err
		return o
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", job.key)
	resp, err := client.Do(req)
	if err != nil {
		o.err = err
		return o
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		o.err = err
		return o
	}
	o.status = resp.StatusCode
	o.replayed = resp.Header.Get(idempotency.ReplayedHeader) == "true"
	o.body = string(b)
	if resp.Header.Get("Content-Type") == "application/problem+json" {
		var p struct{ Type string }
		if json.Unmarshal(b, &p) == nil {
			o.ptype = p.Type
		}
	}
	return o
}
