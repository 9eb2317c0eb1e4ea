package idempotency

import (
	"context"
	"time"
)

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
func (s *settings) awaitInFlight(ctx context.Context, skey, token string, rec *Record) (*Record, monoTime, error) {
	deadline := time.Now().Add(s.wait)
	watcher, _ := s.store.(Watcher)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	poll := waitFirstPoll
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return rec, 0, nil
		}
		var changed <-chan struct{}
		wait := min(poll, left)
		if watcher != nil {
			// A nil channel means the key is no longer in flight: look
			// again at once. Otherwise sleep until it changes, bounded by
			// the owner's lease, which can run out without notice.
			if changed = watcher.Watch(skey); changed == nil {
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
				return rec, 0, nil
			}
			timer.Stop()
		}
		poll = min(2*poll, waitMaxPoll)

		claimedAt := monoNow()
		cctx, cancel := s.storeContext(ctx)
		next, err := s.store.Claim(cctx, skey, token, s.lockTTL)
		cancel()
		if err != nil || next == nil || next.State == StateCompleted {
			return next, claimedAt, err
		}
		rec = next
	}
}
