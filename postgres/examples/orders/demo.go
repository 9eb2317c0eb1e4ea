package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/f8e778d0/idempotency"
)

// errDemo marks an answer the demo did not expect, so that -demo exits
// non-zero when the middleware misbehaves.
var errDemo = errors.New("unexpected outcome")

// reply is what the demo client got back.
type reply struct {
	status   int
	replayed bool
	location string
	body     []byte
}

func (r reply) String() string {
	s := fmt.Sprintf("%d %s", r.status, http.StatusText(r.status))
	if r.replayed {
		s += ", " + idempotency.ReplayedHeader + ": true"
	}
	return s
}

// runDemo serves h on a free loopback port and plays one client against
// it: an order, its retry, the key reused for another order. It prints
// what each request got and checks the orders table after each step.
func runDemo(ctx context.Context, out io.Writer, a *api, h http.Handler) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	base := "http://" + ln.Addr().String()

	client := &http.Client{Timeout: 10 * time.Second}
	send := func(method, path, key, body string) (reply, error) {
		req, err := http.NewRequestWithContext(ctx, method, base+path, strings.NewReader(body))
		if err != nil {
			return reply{}, err
		}
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		resp, err := client.Do(req)
		if err != nil {
			return reply{}, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return reply{resp.StatusCode, resp.Header.Get(idempotency.ReplayedHeader) == "true",
			resp.Header.Get("Location"), bytes.TrimSpace(b)}, err
	}
	key := rand.Text() // a client makes one key per order and sends it with every retry
	rows := func() (n int, err error) {
		err = a.pool.QueryRow(ctx, `SELECT count(*) FROM `+a.table+` WHERE idempotency_key = $1`, key).Scan(&n)
		return n, err
	}
	var failed []error
	expect := func(ok bool, what string) {
		if !ok {
			failed = append(failed, fmt.Errorf("%w: %s", errDemo, what))
		}
	}

	fmt.Fprintf(out, "orders API on %s, orders in table %s\nIdempotency-Key: %s\n\n", base, a.table, key)
	order, other := `{"amount":1299,"currency":"EUR"}`, `{"amount":2500,"currency":"EUR"}`

	first, err := send(http.MethodPost, "/orders", key, order)
	if err != nil {
		return err
	}
	n, err := rows()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "1. POST /orders %s\n   -> %s, Location %s\n   %s\n   The handler ran; its INSERT committed with the stored response. Rows with this key: %d.\n\n",
		order, first, first.location, first.body, n)
	expect(first.status == http.StatusCreated && !first.replayed, "the first POST was not a new 201")
	expect(n == 1, "the first POST did not leave one row")

	retry, err := send(http.MethodPost, "/orders", key, order)
	if err != nil {
		return err
	}
	n, err = rows()
	if err != nil {
		return err
	}
	same := bytes.Equal(retry.body, first.body) && retry.location == first.location
	fmt.Fprintf(out, "2. The same POST again, as a client retrying after a timeout\n   -> %s, same body and Location: %t\n   The handler did not run. Rows with this key: %d.\n\n",
		retry, same, n)
	expect(retry.status == http.StatusCreated && retry.replayed && same, "the retry was not the replayed 201")
	expect(n == 1, "the retry added a row")

	reused, err := send(http.MethodPost, "/orders", key, other)
	if err != nil {
		return err
	}
	n, err = rows()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "3. The same key with another order, POST /orders %s\n   -> %s\n   %s\n   Refused: a key names one request. Rows with this key: %d.\n\n",
		other, reused, reused.body, n)
	expect(reused.status == http.StatusUnprocessableEntity, "the reused key was not refused with 422")
	expect(n == 1, "the reused key added a row")

	got, err := send(http.MethodGet, first.location, "", "")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "4. GET %s\n   -> %s\n   %s\n\n", first.location, got, got.body)
	expect(got.status == http.StatusOK, "the new order could not be read back")

	if err := errors.Join(failed...); err != nil {
		fmt.Fprintf(out, "FAILED:\n%v\n", err)
		return err
	}
	fmt.Fprintln(out, "One order, however often the client retried.")
	return nil
}
