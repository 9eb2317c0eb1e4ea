package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/f8e778d0/idempotency"
)

// concurrentDuplicates is how many requests with one fresh key the demo
// sends at once.
const concurrentDuplicates = 10

// ordersExpected is how many orders the scenarios may create: the first
// POST and exactly one of the concurrent duplicates. Every other request is
// a replay or is refused.
const ordersExpected = 2

// errInvariant marks an outcome the middleware promises never to produce,
// such as a duplicate that ran the handler a second time.
var errInvariant = errors.New("invariant violated")

// runDemo serves the API on a free loopback port, drives the scripted
// client through the scenarios, prints what each request got to out, shuts
// the server down and reports any broken invariant as an error.
func runDemo(ctx context.Context, out io.Writer, delay time.Duration) error {
	store := idempotency.NewMemoryStore()
	defer store.Close()
	api := &orderAPI{delay: delay}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	serverCtx, stopServer := context.WithCancel(ctx)
	defer stopServer()
	served := make(chan error, 1)
	go func() { served <- serveUntil(serverCtx, newServer(newRoutes(api, store, nil)), ln) }()

	baseURL := "http://" + ln.Addr().String()
	fmt.Fprintf(out, "orders API on %s, each order takes %v to create\n\n", baseURL, delay)
	client := &http.Client{Timeout: delay + 10*time.Second}
	report, err := runScenarios(ctx, client, baseURL)
	client.CloseIdleConnections()

	stopServer()
	if serveErr := <-served; serveErr != nil {
		err = errors.Join(err, fmt.Errorf("shut down: %w", serveErr))
	}
	if err != nil {
		return err
	}

	report.print(out)
	if err := report.check(); err != nil {
		fmt.Fprintf(out, "\nFAILED:\n%v\n", err)
		return err
	}
	fmt.Fprintln(out, "\nevery duplicate was replayed or refused: no order was created twice")
	return nil
}

// outcome is what one request of the demo got back.
type outcome struct {
	scenario string
	request  string // method and path
	key      string // the key's label in the table: "A", "B" or "none"
	body     string // the order asked for, such as "1 book"
	status   int
	replayed bool   // the response carried X-Idempotent-Replayed: true
	location string // the Location header
	respBody []byte
	order    *order               // the decoded body of a 2xx response
	problem  *idempotency.Problem // the decoded body of an error response
}

// executed reports whether the handler ran for this request and created
// an order: a 201 that is not a replay.
func (o *outcome) executed() bool {
	return o.status == http.StatusCreated && !o.replayed
}

// demoReport holds the outcome of every scenario.
type demoReport struct {
	first      outcome   // a new key: the handler runs
	retry      outcome   // the same key and body: the stored 201 is replayed
	concurrent []outcome // one fresh key sent many times at once
	mismatch   outcome   // the first key with a different body: 422
	missingKey outcome   // no key on the route that requires one: 400
	created    int       // orders listed by GET /orders at the end
}

// runScenarios sends the demo's requests to the API at baseURL.
func runScenarios(ctx context.Context, client *http.Client, baseURL string) (*demoReport, error) {
	c := &demoClient{client: client, baseURL: baseURL}
	book, pens := orderRequest{Item: "book", Quantity: 1}, orderRequest{Item: "pen", Quantity: 3}
	// A client makes a fresh random key per operation and sends the same
	// key with every retry of that operation.
	keyA, keyB := demoKey{"A", rand.Text()}, demoKey{"B", rand.Text()}
	noKey := demoKey{label: "none"}

	var rep demoReport
	var err error
	if rep.first, err = c.post(ctx, "first POST", "/orders", keyA, book); err != nil {
		return nil, err
	}
	if rep.retry, err = c.post(ctx, "retry, same key", "/orders", keyA, book); err != nil {
		return nil, err
	}
	if rep.concurrent, err = c.postConcurrently(ctx, "concurrent", "/orders", keyB, pens); err != nil {
		return nil, err
	}
	if rep.mismatch, err = c.post(ctx, "same key, other body", "/orders", keyA, pens); err != nil {
		return nil, err
	}
	if rep.missingKey, err = c.post(ctx, "missing required key", "/checkout", noKey, book); err != nil {
		return nil, err
	}
	if rep.created, err = c.countOrders(ctx); err != nil {
		return nil, err
	}
	return &rep, nil
}

// demoClient sends requests to one server and decodes the answers.
type demoClient struct {
	client  *http.Client
	baseURL string
}

// demoKey is an idempotency key and the short label the table shows for
// it. An empty value sends no key.
type demoKey struct {
	label, value string
}

// post sends body to path with the given idempotency key.
func (c *demoClient) post(ctx context.Context, scenario, path string, key demoKey, body orderRequest) (outcome, error) {
	reqBody, err := json.Marshal(body)
	if err != nil {
		return outcome{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.baseURL+path, bytes.NewReader(reqBody))
	if err != nil {
		return outcome{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if key.value != "" {
		req.Header.Set("Idempotency-Key", key.value)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return outcome{}, fmt.Errorf("%s: %w", scenario, err)
	}
	defer resp.Body.Close()
	respBody, err := io.ReadAll(resp.Body)
	if err != nil {
		return outcome{}, fmt.Errorf("%s: %w", scenario, err)
	}

	o := outcome{
		scenario: scenario,
		request:  "POST " + path,
		key:      key.label,
		body:     fmt.Sprintf("%d %s", body.Quantity, body.Item),
		status:   resp.StatusCode,
		replayed: resp.Header.Get(idempotency.ReplayedHeader) == "true",
		location: resp.Header.Get("Location"),
		respBody: respBody,
	}
	if resp.StatusCode < 300 {
		o.order = new(order)
		err = json.Unmarshal(respBody, o.order)
	} else {
		o.problem = new(idempotency.Problem)
		err = json.Unmarshal(respBody, o.problem)
	}
	if err != nil {
		return outcome{}, fmt.Errorf("%s: decode %d response: %w", scenario, resp.StatusCode, err)
	}
	return o, nil
}

// postConcurrently sends the same request concurrentDuplicates times at
// once, as a client that retries aggressively, or several processes
// handling one message, might.
func (c *demoClient) postConcurrently(ctx context.Context, scenario, path string, key demoKey, body orderRequest) ([]outcome, error) {
	outcomes := make([]outcome, concurrentDuplicates)
	errs := make([]error, concurrentDuplicates)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range outcomes {
		wg.Go(func() {
			<-start // release all requests together so they overlap
			name := fmt.Sprintf("%s #%d", scenario, i+1)
			outcomes[i], errs[i] = c.post(ctx, name, path, key, body)
		})
	}
	close(start)
	wg.Wait()
	return outcomes, errors.Join(errs...)
}

// countOrders asks the API how many orders exist.
func (c *demoClient) countOrders(ctx context.Context) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.baseURL+"/orders", nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("list orders: status %d", resp.StatusCode)
	}
	var orders []order
	if err := json.NewDecoder(resp.Body).Decode(&orders); err != nil {
		return 0, fmt.Errorf("list orders: %w", err)
	}
	return len(orders), nil
}

// all returns the outcomes in the order the requests were sent.
func (r *demoReport) all() []outcome {
	all := []outcome{r.first, r.retry}
	all = append(all, r.concurrent...)
	return append(all, r.mismatch, r.missingKey)
}

// print writes the outcomes as an aligned table, then the order count.
func (r *demoReport) print(out io.Writer) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SCENARIO\tREQUEST\tKEY\tBODY\tSTATUS\tREPLAYED\tRESULT")
	for _, o := range r.all() {
		replayed := "no"
		if o.replayed {
			replayed = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d %s\t%s\t%s\n",
			o.scenario, o.request, o.key, o.body, o.status, http.StatusText(o.status), replayed, o.result())
	}
	_ = tw.Flush()
	fmt.Fprintf(out, "\norders created: %d (expected %d)\n", r.created, ordersExpected)
}

// result summarises the response body: the order, or the problem detail.
func (o *outcome) result() string {
	switch {
	case o.order != nil:
		return fmt.Sprintf("order %d, Location %s", o.order.ID, o.location)
	case o.problem != nil:
		return o.problem.Detail
	}
	return ""
}

// check verifies what the middleware promises, returning every violation
// joined, each wrapping errInvariant.
func (r *demoReport) check() error {
	var errs []error
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: %s", errInvariant, fmt.Sprintf(format, args...)))
	}

	if !r.first.executed() {
		fail("first POST: got %d (replayed %t), want a new 201", r.first.status, r.first.replayed)
	}
	if r.retry.status != http.StatusCreated || !r.retry.replayed {
		fail("retry: got %d (replayed %t), want the replayed 201", r.retry.status, r.retry.replayed)
	}
	if !bytes.Equal(r.retry.respBody, r.first.respBody) || r.retry.location != r.first.location {
		fail("retry: the replay differs from the first response")
	}

	var winner *outcome
	for i := range r.concurrent {
		if o := &r.concurrent[i]; o.executed() {
			if winner != nil {
				fail("%s: the handler ran again (order %d after order %d)", o.scenario, o.order.ID, winner.order.ID)
				continue
			}
			winner = o
		}
	}
	if winner == nil {
		fail("concurrent duplicates: none created the order")
	}
	for _, o := range r.concurrent {
		switch {
		case o.executed(), o.status == http.StatusConflict:
		case o.status == http.StatusCreated && o.replayed:
			// Sent after the winner finished: it gets the stored response.
			if winner != nil && !bytes.Equal(o.respBody, winner.respBody) {
				fail("%s: the replay differs from the response it replays", o.scenario)
			}
		default:
			fail("%s: got %d, want 201 once and 409 or a replay otherwise", o.scenario, o.status)
		}
	}

	if r.mismatch.status != http.StatusUnprocessableEntity {
		fail("same key, other body: got %d, want 422", r.mismatch.status)
	}
	if r.missingKey.status != http.StatusBadRequest {
		fail("missing key: got %d, want 400", r.missingKey.status)
	}
	if r.created != ordersExpected {
		fail("%d orders created, want %d", r.created, ordersExpected)
	}
	return errors.Join(errs...)
}
