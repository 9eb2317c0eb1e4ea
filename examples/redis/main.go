// Command redis is the orders example on Redis: run several instances of it
// on different ports (or machines) against one Redis, and a retry that lands
// on another instance is replayed there instead of creating a second order.
// The orders live in the same Redis, so every instance lists them all.
//
//	go run ./examples/redis -addr :8081 -name a    # Redis on 127.0.0.1:6379
//	go run ./examples/redis -addr :8082 -name b
//
// Create an order on one instance, send the same request to the other:
//
//	curl -i localhost:8081/orders -H 'Idempotency-Key: k1' -d '{"item":"book","quantity":1}'
//	curl -i localhost:8082/orders -H 'Idempotency-Key: k1' -d '{"item":"book","quantity":1}'
//
// The second answer carries X-Idempotent-Replayed: true and the body the
// first instance wrote ("created_by":"a"). The -redis flag takes one
// address, several comma-separated Redis Cluster seed addresses, or, with
// -sentinel-master, the addresses of Sentinels.
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
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/f8e778d0/idempotency"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "redis example:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("addr", ":8080", "address to serve on")
	redisAddrs := flag.String("redis", "127.0.0.1:6379", "Redis address; several comma-separated addresses: Redis Cluster seeds, or Sentinels with -sentinel-master")
	master := flag.String("sentinel-master", "", "Sentinel master name: -redis then lists the Sentinels")
	prefix := flag.String("prefix", "orders-example:", "prefix of every Redis key this example writes")
	name := flag.String("name", "", "instance name written into the orders it creates (default: the listen address)")
	delay := flag.Duration("delay", 50*time.Millisecond, "how long creating an order takes")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	client := newClient(strings.Split(*redisAddrs, ","), *master)
	defer client.Close()
	// Fail at start rather than with a 503 on the first request when Redis
	// is not there. Later outages are the middleware's business: 503s
	// until Redis is back, then the same client reconnects by itself.
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := client.Ping(pingCtx).Err()
	cancel()
	if err != nil {
		return fmt.Errorf("redis at %s: %w", *redisAddrs, err)
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	if *name == "" {
		*name = ln.Addr().String()
	}
	api := &orderAPI{rdb: client, prefix: *prefix, instance: *name, delay: *delay}
	slog.Info("serving orders API on Redis", "addr", ln.Addr().String(), "instance", *name, "redis", *redisAddrs)
	return serveUntil(ctx, newServer(newRoutes(api, idempotency.SlogObserver(slog.Default().With("instance", *name)))), ln)
}

// newClient returns the go-redis client for addrs. NewUniversalClient picks
// the kind from the options: a Sentinel failover client when master is set,
// a Cluster client for several addresses, a plain client for one. The
// idempotency store takes any of them.
func newClient(addrs []string, master string) redis.UniversalClient {
	return redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:      addrs,
		MasterName: master,
		// The middleware bounds every store call with a context deadline
		// (Config.StoreTimeout, 2s by default). go-redis applies that
		// deadline to the socket only with ContextTimeoutEnabled: without
		// it, a Redis that accepts connections but never answers holds
		// each call for ReadTimeout (5s by default), and each retry
		// (MaxRetries, default 3) can wait again. With it, a hung Redis
		// costs a request at most StoreTimeout: a fast 503 with
		// Retry-After, never a hung request.
		ContextTimeoutEnabled: true,
	})
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
