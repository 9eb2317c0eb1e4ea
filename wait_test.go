package idempotency_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// waitStores are the stores wait mode is tested on: the memory store wakes
// waiters through Watcher, the Redis store (on miniredis) is polled.
func waitStores(t *testing.T) map[string]func(t *testing.T) idempotency.Store {
	return map[string]func(t *testing.T) idempotency.Store{
		"memory": func(t *testing.T) idempotency.Store { return idempotency.NewMemoryStore() },
		"redis": func(t *testing.T) idempotency.Store {
			m := miniredis.RunT(t)
			client := redis.NewClient(&redis.Options{Addr: m.Addr()})
			t.Cleanup(func() { client.Close() })
			return idempotency.NewRedisStore(client)
		},
	}
}

// waitBurst sends n concurrent requests with one key and returns their
// statuses and bodies.
func waitBurst(t *testing.T, url string, n int) (statuses []int, bodies []string) {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n}}
	defer client.CloseIdleConnections()
	statuses, bodies = make([]int, n), make([]string, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(`{}`))
			req.Header.Set("Idempotency-Key", "wait")
			resp, err := client.Do(req)
			if !assert.NoError(t, err) {
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			statuses[i], bodies[i] = resp.StatusCode, string(b)
		}()
	}
	close(start)
	wg.Wait()
	return statuses, bodies
}

func TestWaitModeDuplicatesGetTheReplay(t *testing.T) {
	for name, newStore := range waitStores(t) {
		t.Run(name, func(t *testing.T) {
			lcNoLeak(t)
			var runs atomic.Int64
			s := lcStart(t, idempotency.Config{Store: newStore(t), WaitForInFlight: 5 * time.Second},
				func(w http.ResponseWriter, r *http.Request) {
					n := runs.Add(1)
					time.Sleep(100 * time.Millisecond)
					w.WriteHeader(http.StatusCreated)
					fmt.Fprintf(w, "order %d", n)
				})
			statuses, bodies := waitBurst(t, s.URL, 50)
			for i := range statuses {
				assert.Equal(t, http.StatusCreated, statuses[i], "request %d", i)
				assert.Equal(t, "order 1", bodies[i], "request %d", i)
			}
			assert.EqualValues(t, 1, runs.Load())
			assert.Zero(t, s.events.count(idempotency.OutcomeConflict))
		})
	}
}

func TestWaitModeReleasedClaimRunsOnce(t *testing.T) {
	for name, newStore := range waitStores(t) {
		t.Run(name, func(t *testing.T) {
			var runs atomic.Int64
			s := lcStart(t, idempotency.Config{Store: newStore(t), WaitForInFlight: 5 * time.Second},
				func(w http.ResponseWriter, r *http.Request) {
					n := runs.Add(1)
					time.Sleep(50 * time.Millisecond)
					if n == 1 {
						w.WriteHeader(http.StatusServiceUnavailable) // released: a waiter runs
						return
					}
					w.WriteHeader(http.StatusCreated)
					fmt.Fprintf(w, "order %d", n)
				})
			statuses, bodies := waitBurst(t, s.URL, 20)
			var unavailable, created int
			for i := range statuses {
				switch statuses[i] {
				case http.StatusServiceUnavailable:
					unavailable++
				case http.StatusCreated:
					created++
					assert.Equal(t, "order 2", bodies[i])
				default:
					t.Errorf("request %d: unexpected status %d", i, statuses[i])
				}
			}
			assert.Equal(t, 1, unavailable)
			assert.Equal(t, 19, created)
			assert.EqualValues(t, 2, runs.Load(), "after the release exactly one waiter runs")
		})
	}
}

func TestWaitModeBoundedAndCancellable(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{})
	s := lcStart(t, idempotency.Config{WaitForInFlight: 150 * time.Millisecond},
		func(w http.ResponseWriter, r *http.Request) {
			close(started)
			<-release
			w.WriteHeader(http.StatusCreated)
		})
	defer close(release)
	go lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	<-started

	// The wait is bounded: 409 once it runs out.
	begin := time.Now()
	r := lcDo(t, s.URL, http.MethodPost, "k", `{}`)
	assert.Equal(t, http.StatusConflict, r.status)
	assert.GreaterOrEqual(t, time.Since(begin), 150*time.Millisecond)

	// A waiter whose context ends returns promptly.
	long := lcStart(t, idempotency.Config{WaitForInFlight: time.Hour}, func(w http.ResponseWriter, r *http.Request) {
		<-release
	})
	go lcDo(t, long.URL, http.MethodPost, "k", `{}`)
	require.Eventually(t, func() bool { return long.runs.Load() == 1 }, 2*time.Second, time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, long.URL, strings.NewReader(`{}`))
	req.Header.Set("Idempotency-Key", "k")
	req.Header.Set("Content-Type", "application/json")
	begin = time.Now()
	_, err := http.DefaultClient.Do(req)
	assert.Error(t, err)
	assert.Less(t, time.Since(begin), 2*time.Second)
	assert.EqualValues(t, 1, long.runs.Load())
}
