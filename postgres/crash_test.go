package postgres_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

// The crash tests run the service in a child process, which they kill: the
// test binary runs itself with these variables set, and TestMain then
// runs serveCrashChild instead of the tests. The child prints one line per
// event on its standard output: "LISTEN addr" once it serves, "LOCK" for
// each try of a key's advisory lock, "INSERTED key" when it holds after the
// business insert, "RESPONSE key body" when the handler answers,
// "COMMITTED key" when it holds after the commit.
const (
	crashHoldEnv   = "IDEMPOTENCY_CRASH_CHILD" // the child's hold, below; unset outside a child
	crashTableEnv  = "IDEMPOTENCY_CRASH_TABLE"
	crashOrdersEnv = "IDEMPOTENCY_CRASH_ORDERS"
)

// Where a child holds a request until it is killed.
const (
	holdNone   = "none"   // nowhere: the restarted service
	holdInsert = "insert" // in the handler, after its INSERT, before the COMMIT
	holdCommit = "commit" // in the observer, after the COMMIT, before the response
)

// crashBody is the body of every order the crash tests send.
const crashBody = `{"amount":42}`

// TestMain runs the service of the crash tests when the test binary is
// one of their child processes, and the tests otherwise.
func TestMain(m *testing.M) {
	if hold := os.Getenv(crashHoldEnv); hold != "" {
		err := serveCrashChild(hold)
		fmt.Fprintln(os.Stderr, "crash child:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// serveCrashChild is the service that the crash tests run in a child process
// and kill. It returns only on an error.
func serveCrashChild(hold string) error {
	// The parent holds our standard input open: if it dies, so do we.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(3)
	}()

	out := &crashOutput{}
	cfg, err := pgxpool.ParseConfig(os.Getenv(dsnEnv))
	if err != nil {
		return err
	}
	cfg.MaxConns = 4
	cfg.ConnConfig.Tracer = crashLockTracer{out}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return err
	}
	defer pool.Close()

	h := &crashOrders{
		orders:   pgx.Identifier{os.Getenv(crashOrdersEnv)}.Sanitize(),
		answered: func(key, body string) { out.line("RESPONSE " + key + " " + body) },
	}
	if hold == holdInsert {
		h.afterInsert = func(r *http.Request) {
			out.line("INSERTED " + r.Header.Get("Idempotency-Key"))
			select {}
		}
	}
	mw := idempotency.New(idempotency.Config{
		Store:           postgres.NewStore(pool, postgres.WithTable(os.Getenv(crashTableEnv)), postgres.Transactional()),
		WaitForInFlight: 5 * time.Second,
		Observer: func(e idempotency.Event) {
			// The core tells the observer of a commit after COMMIT
			// succeeded and before it writes the response.
			if hold == holdCommit && e.Outcome == idempotency.OutcomeExecuted {
				out.line("COMMITTED " + e.Request.Header.Get("Idempotency-Key"))
				select {}
			}
		},
	})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	out.line("LISTEN " + ln.Addr().String())
	srv := &http.Server{Handler: mw(h), ReadHeaderTimeout: 10 * time.Second}
	return fmt.Errorf("serve: %w", srv.Serve(ln))
}

// crashOutput writes a child's event lines, one at a time.
type crashOutput struct{ mu sync.Mutex }

func (o *crashOutput) line(s string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintln(os.Stdout, s)
}

// crashLockTracer is a pgx tracer that reports each try of an advisory
// lock, so that the parent knows when a duplicate request is polling.
type crashLockTracer struct{ out *crashOutput }

func (crashLockTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (crashLockTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (crashLockTracer) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return ctx
}

func (c crashLockTracer) TraceBatchQuery(_ context.Context, _ *pgx.Conn, d pgx.TraceBatchQueryData) {
	if strings.Contains(d.SQL, "pg_try_advisory_xact_lock") {
		c.out.line("LOCK")
	}
}

func (crashLockTracer) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// crashOrders is the business handler of the crash tests: it inserts the
// order into the orders table through the request's transaction, and
// answers 201 with the new order's id. The hooks, when set, run before
// and after the INSERT (and may block) and see the answer.
type crashOrders struct {
	orders       string // quoted table name
	beforeInsert func(r *http.Request)
	afterInsert  func(r *http.Request)
	answered     func(key, body string)
}

func (h *crashOrders) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	tx := postgres.Tx(r.Context())
	if err != nil || tx == nil {
		http.Error(w, "no transaction", http.StatusInternalServerError)
		return
	}
	key := r.Header.Get("Idempotency-Key")
	if h.beforeInsert != nil {
		h.beforeInsert(r)
	}
	var id int64
	err = tx.QueryRow(r.Context(), "INSERT INTO "+h.orders+" (idem_key, body) VALUES ($1, $2) RETURNING id",
		key, string(body)).Scan(&id)
	if err != nil {
		http.Error(w, "insert failed", http.StatusInternalServerError)
		return
	}
	if h.afterInsert != nil {
		h.afterInsert(r)
	}
	answer := fmt.Sprintf(`{"order":%d,"key":%q}`, id, key)
	if h.answered != nil {
		h.answered(key, answer)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_, _ = io.WriteString(w, answer)
}

// crashTables are the idempotency table and the orders table of a test.
type crashTables struct {
	idem, orders string
	pool         *pgxpool.Pool
}

// newCrashTables creates, in pool, a migrated idempotency table and an
// orders table with no unique constraint on the key (only the middleware
// may prevent a duplicate); both are dropped when the test ends.
func newCrashTables(t *testing.T, pool *pgxpool.Pool) crashTables {
	t.Helper()
	tables := crashTables{idem: randomTable(t, pool), orders: randomTable(t, pool), pool: pool}
	require.NoError(t, postgres.NewStore(pool, postgres.WithTable(tables.idem)).Migrate(t.Context()))
	_, err := pool.Exec(t.Context(), "CREATE TABLE "+tables.ordersSQL()+
		" (id bigserial PRIMARY KEY, idem_key text NOT NULL, body text NOT NULL)")
	require.NoError(t, err)
	return tables
}

func (c crashTables) ordersSQL() string { return pgx.Identifier{c.orders}.Sanitize() }

// store returns a transactional store on the idempotency table in pool.
func (c crashTables) store(pool *pgxpool.Pool) *postgres.Store {
	return postgres.NewStore(pool, postgres.WithTable(c.idem), postgres.Transactional())
}

// handler returns the orders handler on the orders table.
func (c crashTables) handler() *crashOrders { return &crashOrders{orders: c.ordersSQL()} }

// orderCount returns how many orders were committed under key.
func (c crashTables) orderCount(t *testing.T, key string) int {
	t.Helper()
	var n int
	require.NoError(t, c.pool.QueryRow(t.Context(),
		"SELECT count(*) FROM "+c.ordersSQL()+" WHERE idem_key = $1", key).Scan(&n))
	return n
}

// committedOrders is how many orders a first attempt left: one if it
// committed, else none.
func committedOrders(committed bool) int {
	if committed {
		return 1
	}
	return 0
}

// crashChild is the service running in a child process.
type crashChild struct {
	cmd    *exec.Cmd
	url    string
	client *http.Client
	lines  chan string
	exited chan struct{}
	stderr crashBuffer
}

// startCrashChild starts the service over tables in a new process, holding
// requests where hold says, and waits until it serves. The child is killed
// when the test ends.
func startCrashChild(t *testing.T, tables crashTables, hold string) *crashChild {
	t.Helper()
	c := &crashChild{lines: make(chan string, 100), exited: make(chan struct{})}
	c.cmd = exec.Command(os.Args[0])
	c.cmd.Env = append(os.Environ(), crashHoldEnv+"="+hold, crashTableEnv+"="+tables.idem,
		crashOrdersEnv+"="+tables.orders, dsnEnv+"="+testDSN(t))
	c.cmd.Stderr = &c.stderr
	stdin, err := c.cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := c.cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, c.cmd.Start())
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		_ = c.cmd.Wait() // after the last read of stdout, as exec asks
		close(c.exited)
	}()
	c.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(func() {
		c.client.CloseIdleConnections()
		_ = c.cmd.Process.Kill()
		_ = stdin.Close()
		<-c.exited
	})
	c.url = "http://" + strings.TrimPrefix(c.expect(t, "LISTEN "), "LISTEN ") + "/orders"
	return c
}

// expect reads the child's lines until one starts with prefix, and
// returns it. Other lines are dropped.
func (c *crashChild) expect(t *testing.T, prefix string) string {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				t.Fatalf("the child exited before printing %q; its stderr:\n%s", prefix, c.stderr.String())
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-timeout:
			t.Fatalf("the child did not print %q in time; its stderr:\n%s", prefix, c.stderr.String())
		}
	}
}

// kill kills the child with SIGKILL (os.Process.Kill on Unix), waits until
// it is gone, and returns when it was killed. No deferred function or
// connection close runs in the child: its sockets are closed by the kernel.
func (c *crashChild) kill(t *testing.T) time.Time {
	t.Helper()
	killed := time.Now()
	require.NoError(t, c.cmd.Process.Kill())
	select {
	case <-c.exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the killed child did not exit")
	}
	return killed
}

// post sends the order under key to the child and returns the answer.
func (c *crashChild) post(t *testing.T, key string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, c.url, strings.NewReader(crashBody))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := c.client.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

// postAsync sends the order under key to the child in the background; the
// channel gets the request's error, nil if it was answered.
func (c *crashChild) postAsync(key string) <-chan error {
	done := make(chan error, 1)
	go func() {
		req, err := http.NewRequest(http.MethodPost, c.url, strings.NewReader(crashBody))
		if err != nil {
			done <- err
			return
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", key)
		resp, err := c.client.Do(req)
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		done <- err
	}()
	return done
}

// crashBuffer is a bytes.Buffer safe for the writes of exec and the reads
// of a test.
type crashBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *crashBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *crashBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// requireFailed checks that a request sent to a child that was then
// killed got no answer.
func requireFailed(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		assert.Error(t, err, "the request to the killed service got no answer")
	case <-time.After(5 * time.Second):
		t.Fatal("the request to the killed service did not end")
	}
}

// TestCrashMatrix kills the service (SIGKILL, a child process) at each
// point of a request in the one-transaction mode, and sends the client's
// retry, with the same key and body, to a new process of the service on
// the same tables. It proves that a crash leaves nothing or everything:
//
//   - killed after the business INSERT, before COMMIT: nothing committed;
//     the retry runs fresh, at once;
//   - killed after COMMIT, before the response was written: the retry
//     replays the response the handler wrote, and the order is not
//     inserted again;
//   - killed while a duplicate request polls for the key held by the
//     first (WaitForInFlight): nothing committed; the retry runs fresh, at
//     once, and the duplicate's retry replays it.
//
// The orders table has no unique constraint: it ends with exactly one row
// per key only because the middleware kept the second execution out.
func TestCrashMatrix(t *testing.T) {
	tables := newCrashTables(t, testPool(t))
	cases := []struct {
		name      string
		hold      string
		duplicate bool // a second request with the key polls when the child is killed
		committed bool // the first attempt committed before the kill
	}{
		{"BeforeCommit", holdInsert, false, false},
		{"AfterCommitBeforeResponse", holdCommit, false, true},
		{"WhileDuplicatePolls", holdInsert, true, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			key := randomName("crash-")
			crashed := startCrashChild(t, tables, c.hold)
			// The restarted service is started now, so that the time
			// measured below is the wait for the key, not a process start.
			restarted := startCrashChild(t, tables, holdNone)

			first := crashed.postAsync(key)
			var written string // the response the handler wrote, if committed
			if c.committed {
				written = strings.TrimPrefix(crashed.expect(t, "RESPONSE "+key+" "), "RESPONSE "+key+" ")
				crashed.expect(t, "COMMITTED "+key)
			} else {
				crashed.expect(t, "INSERTED "+key)
			}
			var duplicate <-chan error
			if c.duplicate {
				duplicate = crashed.postAsync(key)
				// Its first try of the lock found it busy; the second is a
				// poll.
				crashed.expect(t, "LOCK")
				crashed.expect(t, "LOCK")
			}
			require.Equal(t, committedOrders(c.committed), tables.orderCount(t, key),
				"orders committed before the kill")

			killed := crashed.kill(t)
			resp, body := restarted.post(t, key)
			elapsed := time.Since(killed)
			requireFailed(t, first)
			if duplicate != nil {
				requireFailed(t, duplicate)
			}

			assert.Equal(t, http.StatusCreated, resp.StatusCode, "body %s", body)
			if c.committed {
				assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader), "the retry replays")
				assert.Equal(t, written, body, "the retry gets the response the handler wrote")
			} else {
				assert.Empty(t, resp.Header.Get(idempotency.ReplayedHeader), "the retry runs")
			}
			// The key was taken by a transaction-scoped advisory lock on
			// the killed process's connection: the kernel closed that
			// connection, PostgreSQL rolled the transaction back and freed
			// the lock, so the retry runs at once, with no lease to wait
			// for.
			assert.Less(t, elapsed, time.Second, "from the kill to the retry's answer")
			t.Logf("from the kill to the retry's answer: %v", elapsed)

			again, againBody := restarted.post(t, key)
			assert.Equal(t, http.StatusCreated, again.StatusCode)
			assert.Equal(t, "true", again.Header.Get(idempotency.ReplayedHeader))
			assert.Equal(t, body, againBody, "one response for the key")
			assert.Equal(t, 1, tables.orderCount(t, key), "exactly one order for the key")
		})
	}
}

// commitLoss is where a commitProxy breaks the connection that carries the
// middleware's commit batch.
type commitLoss int

const (
	// dropBeforeCommit closes the connection instead of forwarding the
	// bytes that carry COMMIT: the transaction certainly did not commit.
	dropBeforeCommit commitLoss = iota + 1
	// loseCommitAnswer forwards them, waits for PostgreSQL to answer
	// COMMIT, and closes the connection instead of relaying the answer:
	// the transaction committed and the client cannot know it.
	loseCommitAnswer
)

// commitProxy forwards connections to PostgreSQL and breaks the first one
// on which the client sends COMMIT, as loss says.
type commitProxy struct {
	host   string
	port   uint16
	target string
	loss   commitLoss
	fired  atomic.Bool

	mu    sync.Mutex
	conns []net.Conn
}

func newCommitProxy(t *testing.T, target string, loss commitLoss) *commitProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &commitProxy{host: "127.0.0.1", port: uint16(ln.Addr().(*net.TCPAddr).Port), target: target, loss: loss}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { p.serve(c) })
		}
	})
	t.Cleanup(func() {
		_ = ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			_ = c.Close()
		}
		p.mu.Unlock()
		wg.Wait()
	})
	return p
}

func (p *commitProxy) serve(client net.Conn) {
	server, err := net.DialTimeout("tcp", p.target, time.Second)
	if err != nil {
		_ = client.Close()
		return
	}
	p.mu.Lock()
	p.conns = append(p.conns, client, server)
	p.mu.Unlock()
	swallow := make(chan struct{}) // closed once COMMIT went out under loseCommitAnswer
	var wg sync.WaitGroup
	wg.Go(func() { p.toServer(client, server, swallow) })
	wg.Go(func() { p.toClient(server, client, swallow) })
	wg.Wait()
}

// toServer copies the client's bytes to the server, looking for COMMIT.
func (p *commitProxy) toServer(client, server net.Conn, swallow chan struct{}) {
	defer func() { _ = client.Close(); _ = server.Close() }()
	commit := []byte("COMMIT")
	buf := make([]byte, 64<<10)
	var tail []byte // the end of the previous read, for a word split between reads
	for {
		n, err := client.Read(buf)
		if n > 0 {
			seen := append(tail, buf[:n]...)
			if bytes.Contains(seen, commit) && p.fired.CompareAndSwap(false, true) {
				if p.loss == dropBeforeCommit {
					return
				}
				close(swallow)
			}
			if _, err := server.Write(buf[:n]); err != nil {
				return
			}
			tail = append([]byte(nil), seen[max(0, len(seen)-len(commit)+1):]...)
		}
		if err != nil {
			return
		}
	}
}

// toClient copies the server's bytes to the client until COMMIT went out
// under loseCommitAnswer; then it keeps what the server says until the
// server confirmed the commit (the CommandComplete tag "COMMIT"), and
// closes the connection.
func (p *commitProxy) toClient(server, client net.Conn, swallow chan struct{}) {
	defer func() { _ = client.Close(); _ = server.Close() }()
	buf := make([]byte, 64<<10)
	var swallowed []byte
	for {
		n, err := server.Read(buf)
		if n > 0 {
			select {
			case <-swallow:
				swallowed = append(swallowed, buf[:n]...)
				if bytes.Contains(swallowed, []byte("COMMIT\x00")) {
					return
				}
				continue
			default:
			}
			if _, err := client.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestCommitConnectionLost breaks the connection that carries the
// middleware's commit batch (the record's INSERT and COMMIT in one round
// trip), with a proxy between the pool and PostgreSQL:
//
//   - dropped before COMMIT reached the server, with pgx preparing the
//     batch's statements (its default mode) or sending them with their
//     text (QueryExecModeExec): the client gets 503 not-committed, nothing
//     was committed, and the retry runs fresh;
//   - COMMIT forwarded and committed, its answer lost (QueryExecModeExec,
//     where the bytes that carry COMMIT's text also execute it): the
//     client gets 503 not-committed, the order and the response were
//     committed, and the retry replays that response.
//
// Either way the retry, through a working pool, leaves exactly one order.
func TestCommitConnectionLost(t *testing.T) {
	direct := testPool(t)
	tables := newCrashTables(t, direct)
	cases := []struct {
		name      string
		loss      commitLoss
		mode      pgx.QueryExecMode
		committed bool
	}{
		{"DroppedBeforeCommit", dropBeforeCommit, pgx.QueryExecModeCacheStatement, false},
		{"DroppedBeforeCommitExecMode", dropBeforeCommit, pgx.QueryExecModeExec, false},
		{"AnswerLostAfterCommit", loseCommitAnswer, pgx.QueryExecModeExec, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := poolConfig(t)
			proxy := newCommitProxy(t, fmt.Sprintf("%s:%d", cfg.ConnConfig.Host, cfg.ConnConfig.Port), c.loss)
			cfg.ConnConfig.Host, cfg.ConnConfig.Port = proxy.host, proxy.port
			cfg.ConnConfig.DefaultQueryExecMode = c.mode
			// A new pool: in the default mode, COMMIT's text goes out only
			// while a connection prepares it.
			proxied := newPool(t, cfg)

			var mu sync.Mutex
			var written []string
			h := tables.handler()
			h.answered = func(_, body string) {
				mu.Lock()
				defer mu.Unlock()
				written = append(written, body)
			}
			broken := httptest.NewServer(idempotency.New(idempotency.Config{Store: tables.store(proxied)})(h))
			t.Cleanup(broken.Close)
			working := httptest.NewServer(idempotency.New(idempotency.Config{
				Store: tables.store(direct),
				// The dropped connection's transaction holds the key until
				// PostgreSQL notices it is gone.
				WaitForInFlight: 2 * time.Second,
			})(h))
			t.Cleanup(working.Close)

			key := randomName("commit-lost-")
			resp, body := post(t, broken, "/orders", key, crashBody)
			require.True(t, proxy.fired.Load(), "the proxy saw COMMIT")
			assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "body %s", body)
			assert.NotEmpty(t, resp.Header.Get("Retry-After"))
			assert.True(t, strings.HasSuffix(problemType(t, body), idempotency.ProblemNotCommitted), "body %s", body)
			assert.Equal(t, committedOrders(c.committed), tables.orderCount(t, key),
				"orders committed by the first attempt")

			resp, body = post(t, working, "/orders", key, crashBody)
			assert.Equal(t, http.StatusCreated, resp.StatusCode, "body %s", body)
			mu.Lock()
			require.NotEmpty(t, written)
			firstAnswer := written[0]
			mu.Unlock()
			if c.committed {
				assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader), "the retry replays")
				assert.Equal(t, firstAnswer, body, "the retry gets the committed response")
			} else {
				assert.Empty(t, resp.Header.Get(idempotency.ReplayedHeader), "the retry runs")
				assert.NotEqual(t, firstAnswer, body, "the first attempt's order is gone")
			}
			assert.Equal(t, 1, tables.orderCount(t, key), "exactly one order for the key")
		})
	}
}

// TestClientHangUpCommits lets the client hang up while the handler is
// blocked, before its INSERT. The handler's context is not cancelled by
// the hang-up in the one-transaction mode, so the INSERT made with it
// afterwards succeeds and commits with the response; the retry replays
// that response and the orders table holds one row.
func TestClientHangUpCommits(t *testing.T) {
	pool := testPool(t)
	tables := newCrashTables(t, pool)

	entered := make(chan struct{})
	release := make(chan struct{})
	handlerErr := make(chan error, 1) // the handler's context's error once released
	answered := make(chan string, 1)
	h := tables.handler()
	var once sync.Once
	h.beforeInsert = func(r *http.Request) {
		once.Do(func() {
			close(entered)
			<-release
			handlerErr <- r.Context().Err()
		})
	}
	h.answered = func(_, body string) {
		select {
		case answered <- body:
		default:
		}
	}
	committed := make(chan struct{}, 1)
	mw := idempotency.New(idempotency.Config{
		Store: tables.store(pool),
		Observer: func(e idempotency.Event) {
			if e.Outcome == idempotency.OutcomeExecuted {
				select {
				case committed <- struct{}{}:
				default:
				}
			}
		},
	})(h)
	serverCtx := make(chan context.Context, 1) // the first request's own context, as the server made it
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case serverCtx <- r.Context():
		default:
		}
		mw.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)

	key := randomName("hang-up-")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/orders", strings.NewReader(crashBody))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json") // as post sends it: part of the fingerprint
	req.Header.Set("Idempotency-Key", key)
	done := make(chan error, 1)
	go func() {
		resp, err := srv.Client().Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()

	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		close(release)
		t.Fatal("the handler did not start")
	}
	cancel()
	assert.ErrorIs(t, <-done, context.Canceled, "the client hung up")
	select {
	case <-(<-serverCtx).Done(): // the server saw the hang-up
	case <-time.After(5 * time.Second):
		close(release)
		t.Fatal("the server did not see the client hang up")
	}
	close(release)

	assert.NoError(t, <-handlerErr, "the hang-up did not cancel the handler's context")
	select {
	case <-committed:
	case <-time.After(5 * time.Second):
		t.Fatal("the request did not commit")
	}
	written := <-answered

	resp, body := post(t, srv, "/orders", key, crashBody)
	assert.Equal(t, http.StatusCreated, resp.StatusCode)
	assert.Equal(t, "true", resp.Header.Get(idempotency.ReplayedHeader), "the retry replays")
	assert.Equal(t, written, body, "the retry gets the response of the request that was hung up on")
	assert.Equal(t, 1, tables.orderCount(t, key), "exactly one order for the key")
}
