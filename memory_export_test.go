package idempotency

import "time"

// WithTestClock sets the clock a [MemoryStore] reads, for the tests of
// package idempotency_test that move time by hand. The store's own clock
// is not configurable outside tests.
func WithTestClock(now func() time.Time) MemoryOption {
	if now == nil {
		panic("idempotency: WithTestClock needs a non-nil clock")
	}
	return func(o *memoryOptions) { o.now = now }
}

// WatchForTest is the store's watch, for the tests of package
// idempotency_test.
func (s *MemoryStore) WatchForTest(key string) <-chan struct{} { return s.watch(key) }
