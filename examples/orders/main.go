// Command orders is a small orders API whose POST routes are made safe to
// retry by the idempotency middleware, on the in-memory store.
//
//	go run ./examples/orders              # serve on :8080
//	go run ./examples/orders -demo        # run the scripted demo and exit
//
// Try it by hand while it serves:
//
//	curl -i -X POST localhost:8080/orders -H 'Idempotency-Key: k1' -d '{"item":"book","quantity":1}'
//
// Send the same command again: the response is replayed, with
// X-Idempotent-Replayed: true, and no second order is created.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/f8e778d0/idempotency"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "orders:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("addr", ":8080", "address to serve on")
	demo := flag.Bool("demo", false, "serve on a free loopback port, run the scripted client, print the results and exit")
	delay := flag.Duration("delay", 50*time.Millisecond, "how long creating an order takes")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *demo {
		return runDemo(ctx, os.Stdout, *delay)
	}
	return serve(ctx, *addr, *delay)
}

// serve runs the API on addr until ctx is done (Ctrl-C), logging what the
// middleware does with each request.
func serve(ctx context.Context, addr string, delay time.Duration) error {
	store := idempotency.NewMemoryStore()
	defer store.Close()
	api := &orderAPI{delay: delay}

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	slog.Info("serving orders API", "addr", ln.Addr().String())
	return serveUntil(ctx, newServer(newRoutes(api, store, idempotency.SlogObserver(slog.Default()))), ln)
}

// newServer returns an http.Server for h with sensible timeouts.
func newServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       time.Minute,
	}
}

// serveUntil serves on ln until ctx is done, then shuts the server down,
// letting requests in flight finish so that none is cut off between its
// side effect and the storing of its response.
func serveUntil(ctx context.Context, srv *http.Server, ln net.Listener) error {
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}

	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := srv.Shutdown(shutdownCtx)
	if serveErr := <-served; !errors.Is(serveErr, http.ErrServerClosed) {
		err = errors.Join(err, serveErr)
	}
	return err
}
