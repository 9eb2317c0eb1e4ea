package postgres_test

import (
	"context"
	"log"
	"net/http"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/f8e778d0/idempotency"
	"github.com/f8e778d0/idempotency/postgres"
)

// ExampleTransactional runs each keyed POST /orders in a transaction of
// its own: the order's INSERT and the response the middleware stores for
// the key commit together, so a retry either gets that response or, if
// nothing committed, runs afresh. It needs a database, so it has no
// output to check; the runnable version is the orders example of this
// module.
func ExampleTransactional() {
	pool, err := pgxpool.New(context.Background(), os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	id, amount := 1, 1299 // a real handler takes these from the request

	store := postgres.NewStore(pool, postgres.Transactional())
	mw := idempotency.New(idempotency.Config{Store: store, RequireKey: true}) // no key, no transaction: 400
	http.Handle("POST /orders", mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tx := postgres.Tx(r.Context()) // commits with the stored response, or not at all
		if _, err := tx.Exec(r.Context(), `INSERT INTO orders (id, amount) VALUES ($1, $2)`, id, amount); err != nil {
			http.Error(w, "could not save the order", http.StatusInternalServerError) // rolled back
			return
		}
		w.WriteHeader(http.StatusCreated)
	})))
}
