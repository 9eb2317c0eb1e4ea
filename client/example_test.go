package client_test

import (
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"time"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/client"
)

// An http.Client whose POSTs carry an Idempotency-Key and are retried with
// it. Here the server's load balancer answers 503 once; the retry reaches
// the handler, which runs once.
func ExampleTransport() {
	var executions, arrivals atomic.Int32
	orders := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		executions.Add(1)
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, `{"id":"ord_1"}`)
	})
	mw := idempotency.New(idempotency.Config{RequireKey: true})
	flaky := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if arrivals.Add(1) == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		mw(orders).ServeHTTP(w, r)
	})
	srv := httptest.NewServer(flaky)
	defer srv.Close()

	c := &http.Client{Transport: &client.Transport{
		MaxAttempts: 4,
		BaseDelay:   10 * time.Millisecond,
		MaxDelay:    time.Second,
	}}
	resp, err := c.Post(srv.URL+"/orders", "application/json", strings.NewReader(`{"item":"book"}`))
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)

	fmt.Println(resp.StatusCode, string(body))
	fmt.Println("attempts:", arrivals.Load(), "executions:", executions.Load())
	// Output:
	// 201 {"id":"ord_1"}
	// attempts: 2 executions: 1
}

// When the transport gives up, the error carries the key it sent. The
// request may have run: here the handler ran and every response was lost
// on the way back. The application keeps the key (in a queue, say) and
// sends the request again later with it; the server answers with the
// stored response instead of running the handler a second time.
func ExampleError() {
	var executions atomic.Int32
	orders := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := executions.Add(1)
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":"ord_%d"}`, n)
	})
	srv := httptest.NewServer(idempotency.New(idempotency.Config{})(orders))
	defer srv.Close()

	// A network that delivers requests and loses every response.
	lossy := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := http.DefaultTransport.RoundTrip(r)
		if err == nil {
			resp.Body.Close()
			err = errors.New("connection reset by peer")
		}
		return nil, err
	})
	c := &http.Client{Transport: &client.Transport{Base: lossy, MaxAttempts: 2, BaseDelay: time.Millisecond}}
	_, err := c.Post(srv.URL+"/orders", "application/json", strings.NewReader(`{"item":"book"}`))

	var gaveUp *client.Error
	if !errors.As(err, &gaveUp) {
		log.Fatal(err)
	}
	fmt.Println("gave up after", gaveUp.Attempts, "attempts")

	// Later, on a network that works: the same request with the same key.
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/orders", strings.NewReader(`{"item":"book"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(client.DefaultHeaderName, gaveUp.Key)
	resp, err := (&http.Client{Transport: &client.Transport{}}).Do(req)
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.StatusCode, string(body), "replayed:", resp.Header.Get(idempotency.ReplayedHeader))
	fmt.Println("executions:", executions.Load())
	// Output:
	// gave up after 2 attempts
	// 201 {"id":"ord_1"} replayed: true
	// executions: 1
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
