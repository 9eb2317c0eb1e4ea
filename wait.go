package idempotency

import (
	"context"
	"time"
)

// watcher is implemented by a store that can wake requests waiting for an
// in-flight key (Config.WaitForInFlight) as soon as its owner finishes,
// instead of letting them poll. [MemoryStore] does.
type watcher interface {
	// watch returns a channel closed when the claim on the in-flight key
	// ends (completed, released, deleted or taken over), or nil when the
	// key is not in flight. It may never be closed when the owner's lease
	// simply runs out: callers bound their wait.
	watch(key string) <-chan struct{}
}

// Polling bounds for stores that cannot notify waiters.
const (
	waitFirstPoll = 5 * time.Millisecond
	waitMaxPoll   = 250 * time.Millisecond
)

// awaitInFlight waits, for at most Config.WaitForInFlight and never past
// ctx, for the in-flight key skey to finish, claiming it again after each
// change. It returns what the last claim returned: (nil, claimedAt, nil)
// when this request now holds the key (the owner released it), a completed
// record to replay, an error, or, when the wait ran out, the in-flight
// record, which the caller answers with 409.
func (s *settings) awaitInFlight(ctx context.Context, skey, token string, rec *Record) (*Record, time.Time, error) {
	deadline := time.Now().Add(s.wait)
	watcher, _ := s.store.(watcher)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	poll := waitFirstPoll
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return rec, time.Time{}, nil
		}
		var changed <-chan struct{}
		wait := min(poll, left)
		if watcher != nil {
			// A nil channel means the key is no longer in flight: look
			// again at once. Otherwise sleep until it changes, bounded by
			// the owner's lease, which can run out without notice.
			if changed = watcher.watch(skey); changed == nil {
				wait = 0
			} else {
				wait = left
				if lease := rec.LeaseRemaining; lease > 0 {
					wait = min(wait, lease+time.Millisecond)
				}
			}
		}
		if wait > 0 {
			timer.Reset(wait)
			select {
			case <-changed:
			case <-timer.C:
			case <-ctx.Done():
				return rec, time.Time{}, nil
			}
			timer.Stop()
		}
		poll = min(2*poll, waitMaxPoll)

		claimedAt := time.Now()
		cctx, cancel := s.storeContext(ctx)
		next, err := s.store.Claim(cctx, skey, token, s.lockTTL)
		cancel()
		if err != nil || next == nil || next.State == StateCompleted {
			return next, claimedAt, err
		}
		rec = next
	}
}
