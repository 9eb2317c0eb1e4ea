package idempotency

import (
	"context"
	"errors"
	"runtime"
	"testing"
	"time"
)

// TestSharedDeadline proves what a call's context from sharedDeadline is:
// it ends no later than the timeout after it was asked for and no earlier
// than 15/16 of it, calls asked for together share one deadline and a call
// asked for a sixteenth of the timeout later gets a new one; it carries the
// values of the context it was given but not its cancellation; cancelling
// one call leaves the others alone; at the deadline every call's context
// ends with context.DeadlineExceeded.
func TestSharedDeadline(t *testing.T) {
	const timeout = 320 * time.Millisecond
	d := &sharedDeadline{timeout: timeout}
	type key struct{}
	values, cancelValues := context.WithCancel(context.WithValue(context.Background(), key{}, "request"))
	cancelValues()

	start := time.Now()
	a, cancelA := d.context(values)
	defer cancelA()
	b, cancelB := d.context(values)
	defer cancelB()
	end, ok := a.Deadline()
	if !ok {
		t.Fatal("no deadline")
	}
	if endB, _ := b.Deadline(); !endB.Equal(end) {
		t.Errorf("calls asked for together got deadlines %v and %v, want one", end, endB)
	}
	if end.After(time.Now().Add(timeout)) || end.Before(start.Add(timeout-timeout/16)) {
		t.Errorf("deadline %v after the start, want between %v and %v", end.Sub(start), timeout-timeout/16, timeout)
	}
	if got := a.Value(key{}); got != "request" {
		t.Errorf("Value = %v, want the given context's value", got)
	}
	if a.Err() != nil {
		t.Errorf("Err = %v: the given context's cancellation reached the call", a.Err())
	}

	time.Sleep(timeout/16 + 10*time.Millisecond)
	c, cancelC := d.context(values)
	defer cancelC()
	if endC, _ := c.Deadline(); !endC.After(end) {
		t.Errorf("a call asked for %v later got deadline %v, want one after %v", time.Since(start), endC, end)
	}

	cancelA()
	if !errors.Is(a.Err(), context.Canceled) || b.Err() != nil {
		t.Errorf("after cancelling a: a.Err = %v, b.Err = %v; want Canceled and nil", a.Err(), b.Err())
	}
	select {
	case <-b.Done():
	case <-time.After(5 * timeout):
		t.Fatal("the call's context did not end at its deadline")
	}
	if !errors.Is(b.Err(), context.DeadlineExceeded) || !errors.Is(context.Cause(b), context.DeadlineExceeded) {
		t.Errorf("at the deadline: Err = %v, Cause = %v; want DeadlineExceeded", b.Err(), context.Cause(b))
	}
}

// TestSharedDeadlineAfterFunc proves that context.AfterFunc on a call's
// context, which pgx runs for every statement, starts no goroutine (the
// context package finds the call's own cancellation through Value) and
// runs when the call is cancelled.
func TestSharedDeadlineAfterFunc(t *testing.T) {
	d := &sharedDeadline{timeout: time.Minute}
	// The given context has a cancellation of its own, as a request's
	// has: the call's must be the one found.
	values, cancelValues := context.WithCancel(context.Background())
	defer cancelValues()
	ctx, cancel := d.context(values)
	before := runtime.NumGoroutine()
	ran := make(chan struct{}, 100)
	for range 100 {
		context.AfterFunc(ctx, func() { ran <- struct{}{} })
	}
	if n := runtime.NumGoroutine() - before; n > 10 {
		t.Errorf("100 AfterFunc calls started %d goroutines", n)
	}
	cancel()
	for range 100 {
		select {
		case <-ran:
		case <-time.After(10 * time.Second):
			t.Fatal("AfterFunc did not run on cancel")
		}
	}
}
