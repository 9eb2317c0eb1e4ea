package postgres_test

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/f8e778d0/idempotency"
)

// benchRecord is a typical small JSON response.
func benchRecord() *idempotency.Record {
	return &idempotency.Record{
		State:       idempotency.StateCompleted,
		Fingerprint: make([]byte, 32),
		Response: idempotency.Response{
			StatusCode: http.StatusCreated,
			Header: http.Header{
				"Content-Type": {"application/json"},
				"Location":     {"/orders/42"},
			},
			Body: []byte(`{"id":42,"status":"created","amount":1000,"currency":"EUR"}`),
		},
	}
}

// BenchmarkStore measures the store against the PostgreSQL named by
// IDEMPOTENCY_POSTGRES_DSN: a first execution (claim and complete a new
// key) and a replay (claim a completed key), one at a time and from
// parallel goroutines sharing a pool of 8 connections.
func BenchmarkStore(b *testing.B) {
	pool := testPool(b)
	store := newStore(b, pool)
	ctx := context.Background()
	var seq atomic.Int64
	newKey := func() string { return "bench-" + strconv.FormatInt(seq.Add(1), 10) + "-" + randomName("") }

	first := func(key string) error {
		if rec, err := store.Claim(ctx, key, "tok", 30*time.Second); err != nil || rec != nil {
			return fmt.Errorf("Claim: %v, %v", rec, err)
		}
		return store.Complete(ctx, key, "tok", benchRecord(), time.Hour)
	}
	completed := newKey()
	if err := first(completed); err != nil {
		b.Fatal(err)
	}
	ops := []struct {
		name string
		op   func() error
	}{
		{"First", func() error { return first(newKey()) }},
		{"Replay", func() error {
			rec, err := store.Claim(ctx, completed, "other", 30*time.Second)
			if err != nil || rec == nil || rec.State != idempotency.StateCompleted {
				return fmt.Errorf("Claim: %v, %v", rec, err)
			}
			return nil
		}},
	}
	for _, c := range ops {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if err := c.op(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(c.name+"Parallel", func(b *testing.B) {
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := c.op(); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
