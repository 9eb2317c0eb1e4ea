// Command loadtest measures what the idempotency middleware costs a real
// HTTP service over loopback. It serves a small orders API bare (no
// middleware) and behind the middleware on the memory store and, when
// -redis is given, on a Redis store; drives each with a fixed number of
// concurrent clients for a fixed time; and prints requests per second, p50
// and p99 latency, and the ratio to bare.
//
//	go run ./examples/loadtest                          # bare and memory, ~30 s
//	go run ./examples/loadtest -redis 127.0.0.1:6379    # and Redis
//	go run ./examples/loadtest -c 64 -d 10s             # more load, longer
//
// Two workloads run on each server. "mix" sends, per client, first
// executions with fresh keys (50%), replays of keys it completed before
// (30%) and concurrent duplicates, the same fresh key sent twice at once
// (20%). "replay" sends only replays of completed keys. On the protected
// servers the API counts how often each key executed; the program checks
// that no key ran twice and exits with status 1 if one did. It uses its own
// key prefix on Redis and deletes its keys when it ends.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/f8e778d0/idempotency"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

// config holds the flags.
type config struct {
	concurrency int
	duration    time.Duration
	rounds      int
	warmup      time.Duration
	redisAddr   string
	cpuProfile  string
}

func run() error {
	var cfg config
	flag.IntVar(&cfg.concurrency, "c", 16, "concurrent clients")
	flag.DurationVar(&cfg.duration, "d", time.Second, "how long each workload runs on each server in each round")
	flag.IntVar(&cfg.rounds, "rounds", 3, "rounds; the servers take turns in each, so that a change in the machine's load affects them alike")
	flag.DurationVar(&cfg.warmup, "warmup", 200*time.Millisecond, "unmeasured load before each measurement")
	flag.StringVar(&cfg.redisAddr, "redis", "", "Redis address (host:port) to also test the Redis store; empty: skip it")
	flag.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run (servers and load generator) to this file")
	flag.Parse()
	if cfg.concurrency < 1 || cfg.duration <= 0 || cfg.rounds < 1 || cfg.warmup < 0 {
		return errors.New("-c and -rounds must be at least 1, -d positive, -warmup not negative")
	}

	if cfg.cpuProfile != "" {
		f, err := os.Create(cfg.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	servers := []*server{newServer("bare", nil)}
	servers = append(servers, newServer("memory", idempotency.NewMemoryStore()))
	if cfg.redisAddr != "" {
		client := redis.NewClient(&redis.Options{
			Addr:                  cfg.redisAddr,
			PoolSize:              4 * cfg.concurrency,
			ContextTimeoutEnabled: true,
		})
		defer client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := client.Ping(ctx).Err()
		cancel()
		if err != nil {
			return fmt.Errorf("redis at %s: %w", cfg.redisAddr, err)
		}
		prefix := "idempotency-loadtest:" + randomHex(8) + ":"
		defer deleteKeys(client, prefix)
		store := idempotency.NewRedisStore(client, idempotency.WithKeyPrefix(prefix))
		servers = append(servers, newServer("redis", store))
	}
	for _, s := range servers {
		if err := s.start(); err != nil {
			return err
		}
		defer s.stop()
	}

	fmt.Printf("loadtest: %d clients, %d rounds of %v per server and workload after %v of warm-up, loopback, GOMAXPROCS=%d, %s\n\n",
		cfg.concurrency, cfg.rounds, cfg.duration, cfg.warmup, runtime.GOMAXPROCS(0), runtime.Version())
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tserver\trequests\treq/s\tp50\tp99\tvs bare\t201\treplayed\t409\tother\texecuted at most once\t")
	ok := true
	for _, w := range []workload{mixWorkload, replayWorkload} {
		results := make([]result, len(servers))
		for round := range cfg.rounds {
			for i, s := range servers {
				results[i].merge(drive(s, w, round, cfg))
			}
		}
		var bareRPS float64
		for i, s := range servers {
			res := &results[i]
			slices.Sort(res.latencies)
			if s.name == "bare" {
				bareRPS = res.rps()
			}
			once := "n/a (no middleware)"
			if s.protected {
				if dup := s.api.duplicates(); dup > 0 {
					once = fmt.Sprintf("NO: %d keys ran twice", dup)
					ok = false
				} else {
					once = fmt.Sprintf("yes (%d keys)", s.api.keys())
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%.0f\t%v\t%v\t%.0f%%\t%d\t%d\t%d\t%d\t%s\t\n",
				w.name, s.name, res.requests, res.rps(), res.percentile(50), res.percentile(99),
				100*res.rps()/bareRPS, res.created, res.replayed, res.conflicts, res.other, once)
		}
	}
	tw.Flush()
	if !ok {
		return errors.New("a key executed more than once")
	}
	fmt.Println("\nno key executed more than once")
	return nil
}

// server is the orders API served on a loopback port, bare or behind the
// middleware.
type server struct {
	name      string
	protected bool
	api       *ordersAPI
	handler   http.Handler
	srv       *http.Server
	url       string
	client    *http.Client
}

func newServer(name string, store idempotency.Store) *server {
	api := &ordersAPI{executed: make(map[string]int)}
	s := &server{name: name, api: api, handler: api}
	if store != nil {
		s.protected = true
		s.handler = idempotency.New(idempotency.Config{Store: store, TTL: 10 * time.Minute})(api)
	}
	return s
}

func (s *server) start() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("POST /orders", s.handler)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.srv.Serve(ln) }()
	s.url = "http://" + ln.Addr().String() + "/orders"
	s.client = &http.Client{Transport: &http.Transport{
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     time.Minute,
	}}
	return nil
}

func (s *server) stop() {
	s.client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
}

// ordersAPI creates an order from a JSON body and answers 201 with it and
// its Location. It counts the executions of each idempotency key it sees.
type ordersAPI struct {
	nextID atomic.Int64

	mu       sync.Mutex
	executed map[string]int // client key → executions
}

type orderRequest struct {
	Item     string `json:"item"`
	Quantity int    `json:"quantity"`
}

type order struct {
	ID       int64  `json:"id"`
	Item     string `json:"item"`
	Quantity int    `json:"quantity"`
	Status   string `json:"status"`
}

func (a *ordersAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var req orderRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<10)).Decode(&req); err != nil || req.Item == "" || req.Quantity < 1 {
		http.Error(w, "bad order", http.StatusBadRequest)
		return
	}
	if key := r.Header.Get("Idempotency-Key"); key != "" {
		a.mu.Lock()
		a.executed[key]++
		a.mu.Unlock()
	}
	o := order{ID: a.nextID.Add(1), Item: req.Item, Quantity: req.Quantity, Status: "created"}
	body, _ := json.Marshal(o)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Location", "/orders/"+strconv.FormatInt(o.ID, 10))
	w.WriteHeader(http.StatusCreated)
	_, _ = w.Write(body)
}

// duplicates returns how many keys executed more than once.
func (a *ordersAPI) duplicates() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, c := range a.executed {
		if c > 1 {
			n++
		}
	}
	return n
}

// keys returns how many keys executed.
func (a *ordersAPI) keys() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.executed)
}

// workload is what one client does in a loop.
type workload struct {
	name string
	// setup prepares a client before the clock starts.
	setup func(c *clientState)
	// step sends one operation: one request, or two for a duplicate.
	step func(c *clientState)
}

var (
	mixWorkload = workload{
		name:  "mix",
		setup: func(c *clientState) {},
		step: func(c *clientState) {
			switch n := c.rand() % 10; {
			case n < 5 || len(c.done) == 0:
				key := c.freshKey()
				if c.send(key) == http.StatusCreated {
					c.done = append(c.done, key)
				}
			case n < 8:
				c.send(c.done[c.rand()%uint64(len(c.done))])
			default:
				key := c.freshKey()
				var wg sync.WaitGroup
				wg.Add(1)
				go func() {
					defer wg.Done()
					c.sendAs(c.twin, key)
				}()
				c.send(key)
				wg.Wait()
				c.done = append(c.done, key)
			}
		},
	}
	replayWorkload = workload{
		name: "replay",
		setup: func(c *clientState) {
			for range 64 {
				key := c.freshKey()
				c.send(key)
				c.done = append(c.done, key)
			}
		},
		step: func(c *clientState) {
			c.send(c.done[c.rand()%uint64(len(c.done))])
		},
	}
)

// clientState is one client's state; twin records the second request of
// a duplicate, which runs in its own goroutine.
type clientState struct {
	s       *server
	prefix  string // of this client's keys, unique to the run
	n       int
	rng     uint64
	done    []string
	measure bool
	tally   *tally
	twin    *tally
}

func (c *clientState) rand() uint64 { // xorshift64
	c.rng ^= c.rng << 13
	c.rng ^= c.rng >> 7
	c.rng ^= c.rng << 17
	return c.rng
}

func (c *clientState) freshKey() string {
	c.n++
	return c.prefix + strconv.Itoa(c.n)
}

var orderBody = []byte(`{"item":"book","quantity":1}`)

func (c *clientState) send(key string) int { return c.sendAs(c.tally, key) }

// sendAs sends one order with key and records it in t.
func (c *clientState) sendAs(t *tally, key string) int {
	req, err := http.NewRequest(http.MethodPost, c.s.url, bytes.NewReader(orderBody))
	if err != nil {
		panic(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	start := time.Now()
	resp, err := c.s.client.Do(req)
	status := 0
	replayed := false
	if err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		status = resp.StatusCode
		replayed = resp.Header.Get(idempotency.ReplayedHeader) == "true"
	}
	if c.measure {
		t.add(time.Since(start), status, replayed)
	}
	return status
}

// tally is what one client (or its twin) saw.
type tally struct {
	latencies                           []time.Duration
	created, replayed, conflicts, other int
}

func (t *tally) add(d time.Duration, status int, replayed bool) {
	t.latencies = append(t.latencies, d)
	switch {
	case status == http.StatusCreated && replayed:
		t.replayed++
	case status == http.StatusCreated:
		t.created++
	case status == http.StatusConflict:
		t.conflicts++
	default:
		t.other++
	}
}

// result is one workload on one server.
type result struct {
	tally
	requests int
	elapsed  time.Duration
}

// merge adds o to r.
func (r *result) merge(o result) {
	r.latencies = append(r.latencies, o.latencies...)
	r.created += o.created
	r.replayed += o.replayed
	r.conflicts += o.conflicts
	r.other += o.other
	r.requests += o.requests
	r.elapsed += o.elapsed
}

func (r *result) rps() float64 { return float64(r.requests) / r.elapsed.Seconds() }

func (r *result) percentile(p float64) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(r.latencies)))) - 1
	return r.latencies[max(i, 0)].Round(time.Microsecond)
}

// drive runs one round of w on s with cfg.concurrency clients: warm-up,
// then the measured period. The latencies it returns are not sorted.
func drive(s *server, w workload, round int, cfg config) result {
	clients := make([]*clientState, cfg.concurrency)
	for i := range clients {
		clients[i] = &clientState{
			s:      s,
			prefix: "lt-" + w.name + "-" + strconv.Itoa(round) + "-" + strconv.Itoa(i) + "-",
			rng:    uint64(i)*0x9e3779b97f4a7c15 + 1,
			tally:  &tally{},
			twin:   &tally{},
		}
		w.setup(clients[i])
	}
	var measuring, stop atomic.Bool
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				c.measure = measuring.Load()
				w.step(c)
			}
		}()
	}
	time.Sleep(cfg.warmup)
	measuring.Store(true)
	start := time.Now()
	time.Sleep(cfg.duration)
	stop.Store(true)
	elapsed := time.Since(start)
	wg.Wait()

	res := result{elapsed: elapsed}
	for _, c := range clients {
		for _, t := range []*tally{c.tally, c.twin} {
			res.latencies = append(res.latencies, t.latencies...)
			res.created += t.created
			res.replayed += t.replayed
			res.conflicts += t.conflicts
			res.other += t.other
		}
	}
	res.requests = len(res.latencies)
	return res
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// deleteKeys removes the keys this run left in Redis. It never flushes:
// the Redis may be shared.
func deleteKeys(client *redis.Client, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	iter := client.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	var batch []string
	for iter.Next(ctx) {
		if batch = append(batch, iter.Val()); len(batch) == 1000 {
			_ = client.Unlink(ctx, batch...).Err()
			batch = batch[:0]
		}
	}
	if len(batch) > 0 {
		_ = client.Unlink(ctx, batch...).Err()
	}
}
