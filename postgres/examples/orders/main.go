// Command orders is the orders API of a payments-like service on
// PostgreSQL, in the one-transaction mode: the INSERT of an order and the
// response the middleware stores for its Idempotency-Key commit in one
// transaction, or not at all. The orders table has no unique constraint on
// the key; the middleware is what keeps a retry from creating a second
// order. From the module's directory (postgres/):
//
//	go run ./examples/orders -dsn 'postgres://user@127.0.0.1:5432/db?sslmode=disable'        # serve
//	go run ./examples/orders -dsn 'postgres://user@127.0.0.1:5432/db?sslmode=disable' -demo  # scripted session
//
// Try it by hand while it serves (send the command twice: the second
// answer is replayed, and there is still one order):
//
//	curl -i 127.0.0.1:8080/orders -H 'Idempotency-Key: k1' -d '{"amount":1299,"currency":"EUR"}'
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "orders:", err)
		os.Exit(1)
	}
}

// tableName is what the -table and -orders-table flags accept.
var tableName = regexp.MustCompile(`^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,47}$`)

// run parses args, connects, creates the tables if they are missing, then
// serves until interrupted or, with -demo, runs the scripted session.
func run(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("orders", flag.ContinueOnError)
	dsn := fs.String("dsn", "", "PostgreSQL connection string (required), such as postgres://user@127.0.0.1:5432/db?sslmode=disable")
	addr := fs.String("addr", "127.0.0.1:8080", "address to serve on")
	keys := fs.String("table", postgres.DefaultTable, "table of the idempotency records")
	orders := fs.String("orders-table", "orders", "table of the orders")
	demo := fs.Bool("demo", false, "serve on a free loopback port, run a scripted session against it, print what happened and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *dsn == "" {
		return errors.New("-dsn is required, such as -dsn 'postgres://user@127.0.0.1:5432/db?sslmode=disable'")
	}
	for _, name := range []string{*keys, *orders} {
		if !tableName.MatchString(name) {
			return fmt.Errorf("table name %q: use lower-case letters, digits and underscores, at most 48 bytes, optionally after a schema and a dot", name)
		}
	}

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	pool, err := pgxpool.New(ctx, *dsn)
	if err != nil {
		return fmt.Errorf("-dsn: %w", err)
	}
	defer pool.Close()
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		return fmt.Errorf("PostgreSQL does not answer: %w", err)
	}

	store := postgres.NewStore(pool, postgres.WithTable(*keys), postgres.Transactional())
	if err := store.Migrate(ctx); err != nil {
		return err
	}
	a, err := newAPI(ctx, pool, *orders)
	if err != nil {
		return err
	}

	if *demo {
		return runDemo(ctx, out, a, a.routes(store, nil))
	}
	srv := &http.Server{Addr: *addr, Handler: a.routes(store, idempotency.SlogObserver(slog.Default())),
		ReadHeaderTimeout: 5 * time.Second}
	shutdown := make(chan error, 1)
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shutdown <- srv.Shutdown(shutdownCtx) // lets requests in flight commit
	}()
	slog.Info("serving the orders API", "addr", *addr)
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return <-shutdown // before the deferred pool.Close
}

// api serves the orders kept in one table.
type api struct {
	pool  *pgxpool.Pool
	table string // quoted
}

// newAPI returns the API on the orders table named table ("name" or
// "schema.name"), which it creates if it is missing.
func newAPI(ctx context.Context, pool *pgxpool.Pool, table string) (*api, error) {
	a := &api{pool: pool, table: pgx.Identifier(strings.Split(table, ".")).Sanitize()}
	// No unique constraint on idempotency_key: preventing duplicates is the
	// middleware's job. The column is there so that one can count them.
	_, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+a.table+` (
	id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	amount          bigint NOT NULL,
	currency        text NOT NULL,
	idempotency_key text,
	created_at      timestamptz NOT NULL DEFAULT now())`)
	if err != nil {
		return nil, fmt.Errorf("create table %s: %w", a.table, err)
	}
	return a, nil
}

// order is what POST /orders creates and GET /orders/{id} returns.
type order struct {
	ID        int64     `json:"id"`
	Amount    int64     `json:"amount"` // in cents
	Currency  string    `json:"currency"`
	CreatedAt time.Time `json:"created_at"`
}

// routes puts POST /orders behind the middleware, which requires a key
// there: a payment must never run twice. Reads need no key.
func (a *api) routes(store *postgres.Store, observer func(idempotency.Event)) http.Handler {
	mw := idempotency.New(idempotency.Config{Store: store, RequireKey: true, Observer: observer})
	mux := http.NewServeMux()
	mux.Handle("POST /orders", mw(http.HandlerFunc(a.create)))
	mux.HandleFunc("GET /orders/{id}", a.get)
	return mux
}

// create validates the order, INSERTs it through the request's transaction
// and answers 201. The middleware commits the INSERT with this response:
// a retry with the same key gets the response back and INSERTs nothing.
// Every answer below 500, the 400 and 422 included, is stored and replayed.
func (a *api) create(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Amount   int64  `json:"amount"`
		Currency string `json:"currency"`
	}
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil || dec.More() {
		writeProblem(w, http.StatusBadRequest, `The body must be a JSON object such as {"amount":1299,"currency":"EUR"}`)
		return
	}
	switch {
	case req.Amount < 1 || req.Amount > 1_000_000:
		writeProblem(w, http.StatusUnprocessableEntity, "amount must be between 1 and 1000000 cents")
		return
	case req.Currency != "EUR" && req.Currency != "GBP" && req.Currency != "USD":
		writeProblem(w, http.StatusUnprocessableEntity, "currency must be EUR, GBP or USD")
		return
	}

	tx := postgres.Tx(r.Context()) // nil only if this route is not behind the middleware
	if tx == nil {
		writeProblem(w, http.StatusInternalServerError, "The order could not be saved")
		return
	}
	key, _ := idempotency.KeyFromContext(r.Context())
	o := order{Amount: req.Amount, Currency: req.Currency}
	err := tx.QueryRow(r.Context(), `INSERT INTO `+a.table+` (amount, currency, idempotency_key)
VALUES ($1, $2, $3) RETURNING id, created_at`, o.Amount, o.Currency, key).Scan(&o.ID, &o.CreatedAt)
	if err != nil {
		slog.Error("insert order", "err", err)
		// A 5xx is not stored: the transaction rolls back and a retry runs.
		writeProblem(w, http.StatusInternalServerError, "The order could not be saved")
		return
	}
	w.Header().Set("Location", "/orders/"+strconv.FormatInt(o.ID, 10))
	writeJSON(w, http.StatusCreated, o)
}

// get answers GET /orders/{id}, where the Location of a new order points.
func (a *api) get(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		writeProblem(w, http.StatusNotFound, "No such order")
		return
	}
	o := order{ID: id}
	err = a.pool.QueryRow(r.Context(), `SELECT amount, currency, created_at FROM `+a.table+` WHERE id = $1`, id).
		Scan(&o.Amount, &o.Currency, &o.CreatedAt)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		writeProblem(w, http.StatusNotFound, "No such order")
		return
	case err != nil:
		slog.Error("read order", "id", id, "err", err)
		writeProblem(w, http.StatusServiceUnavailable, "The order could not be read")
		return
	}
	writeJSON(w, http.StatusOK, o)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeProblem answers with an RFC 9457 problem, like the middleware's own
// errors, so that a client parses one kind of error body.
func writeProblem(w http.ResponseWriter, status int, detail string) {
	idempotency.WriteProblem(w, nil, &idempotency.Problem{
		Type: "about:blank", Title: http.StatusText(status), Status: status, Detail: detail})
}
