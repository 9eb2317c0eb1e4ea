//go:build !race

// The race detector changes how sync.Pool behaves (it drops items at
// random) and what allocates, so the allocation budgets are held only in
// builds without it.

package idempotency_test

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// allocRuns is how many requests each allocation figure averages over.
const allocRuns = 2000

// allocPerRequest returns the mean allocations of one harness request
// through h, the i-th request using key(i).
func allocPerRequest(h http.Handler, method string, key func(i int) []string) float64 {
	i := 0
	return testing.AllocsPerRun(allocRuns, func() {
		benchServe(h, method, key(i))
		i++
	})
}

// TestAllocBudget holds the middleware to its allocation budgets over the
// bare handler, with the benchmarks' harness: nothing for a request it
// passes through, at most 12 for a first execution and 6 for a replay.
func TestAllocBudget(t *testing.T) {
	bare := http.HandlerFunc(benchHandler)
	store := idempotency.NewMemoryStore()
	h := idempotency.New(idempotency.Config{Store: store})(bare)
	fixed := benchKeys(1)[0]
	fresh := benchKeys(allocRuns + 1)
	require.Equal(t, http.StatusCreated, benchServe(h, http.MethodPost, fixed).Code)
	held := benchKeys(1)[0]
	benchHoldKey(t, store, held)

	base := allocPerRequest(bare, http.MethodPost, func(int) []string { return fixed })
	cases := []struct {
		name   string
		method string
		key    func(i int) []string
		budget float64
	}{
		{"pass-through", http.MethodGet, func(int) []string { return fixed }, 0},
		{"first", http.MethodPost, func(i int) []string { return fresh[i] }, 12},
		{"replay", http.MethodPost, func(int) []string { return fixed }, 6},
		// Not budgeted: the problem response is rendered as JSON.
		{"conflict", http.MethodPost, func(int) []string { return held }, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			over := allocPerRequest(h, tc.method, tc.key) - base
			t.Logf("%s: %.0f allocations over the bare handler's %.0f", tc.name, over, base)
			if tc.budget >= 0 {
				assert.LessOrEqual(t, over, tc.budget, "allocations over the bare handler")
			}
		})
	}
	// The replays were replays and the first executions were stored.
	assert.Equal(t, "true", benchServe(h, http.MethodPost, fixed).Header().Get(idempotency.ReplayedHeader))
	assert.Equal(t, allocRuns+2, store.Len()-1, "records: fixed, the warm-up of first and the held key")
}

// TestAllocMemoryPerRecord measures the heap the memory store keeps per
// stored record of the harness's 100-byte response, beyond the body itself,
// around 100,000 first executions.
//
// The budget is 600 bytes. The memory store keeps a record's header as a
// slice of fields rather than as an http.Header, whose map alone would
// cost about 400 bytes.
func TestAllocMemoryPerRecord(t *testing.T) {
	const budget = 600.0
	perRecord := benchHeapPerRecord(t, 100_000)
	over := perRecord - float64(len(benchResponseBody))
	t.Logf("%.0f bytes of heap per record, %.0f beyond the body (budget %.0f)", perRecord, over, budget)
	assert.LessOrEqual(t, over, budget, "heap bytes per record beyond the body")
}
