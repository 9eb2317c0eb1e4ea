package client_test

import (
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
