package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/f8e778d0/idempotency"
)

// redisExInstance starts one instance of the example, with its own client,
// on the Redis at addr, and returns its URL.
func redisExInstance(t *testing.T, addr, name string) string {
	t.Helper()
	client := newClient([]string{addr}, "")
	t.Cleanup(func() { _ = client.Close() })
	api := &orderAPI{rdb: client, prefix: "orders-test:", instance: name, delay: 50 * time.Millisecond}
	srv := httptest.NewServer(newRoutes(api, nil))
	t.Cleanup(srv.Close)
	return srv.URL
}

// redisExResponse is what a client got back.
type redisExResponse struct {
	status int
	header http.Header
	body   string
}

func (r redisExResponse) replayed() bool {
	return r.header.Get(idempotency.ReplayedHeader) == "true"
}

func (r redisExResponse) order(t *testing.T) order {
	t.Helper()
	var o order
	require.NoError(t, json.Unmarshal([]byte(r.body), &o), r.body)
	return o
}

// redisExDo sends a request; key "" sends none.
func redisExDo(t *testing.T, method, url, key, body string) redisExResponse {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, strings.NewReader(body))
	require.NoError(t, err)
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return redisExResponse{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

// redisExOrders lists the orders an instance sees.
func redisExOrders(t *testing.T, url string) []order {
	t.Helper()
	r := redisExDo(t, http.MethodGet, url+"/orders", "", "")
	require.Equal(t, http.StatusOK, r.status, r.body)
	var orders []order
	require.NoError(t, json.Unmarshal([]byte(r.body), &orders), r.body)
	return orders
}

func TestRedisExampleReplayAcrossInstances(t *testing.T) {
	m := miniredis.RunT(t)
	a := redisExInstance(t, m.Addr(), "a")
	b := redisExInstance(t, m.Addr(), "b")
	const book = `{"item":"book","quantity":1}`

	first := redisExDo(t, http.MethodPost, a+"/orders", "k1", book)
	require.Equal(t, http.StatusCreated, first.status, first.body)
	assert.False(t, first.replayed())
	assert.Equal(t, order{ID: 1, Item: "book", Quantity: 1, CreatedBy: "a"}, first.order(t))
	assert.Equal(t, "/orders/1", first.header.Get("Location"))

	// The client's retry lands on the other instance.
	retry := redisExDo(t, http.MethodPost, b+"/orders", "k1", book)
	assert.Equal(t, http.StatusCreated, retry.status)
	assert.True(t, retry.replayed(), "replayed by b from the record a stored")
	assert.Equal(t, first.body, retry.body, "byte for byte, created_by a")
	assert.Equal(t, "/orders/1", retry.header.Get("Location"))

	// The same key for another order is refused, on either instance.
	other := redisExDo(t, http.MethodPost, b+"/orders", "k1", `{"item":"pen","quantity":2}`)
	assert.Equal(t, http.StatusUnprocessableEntity, other.status, other.body)

	// Both instances see the one order.
	assert.Len(t, redisExOrders(t, a), 1)
	assert.Equal(t, redisExOrders(t, a), redisExOrders(t, b))

	// A new key runs on b; a request without a key is not protected.
	second := redisExDo(t, http.MethodPost, b+"/orders", "k2", book)
	require.Equal(t, http.StatusCreated, second.status)
	assert.Equal(t, order{ID: 2, Item: "book", Quantity: 1, CreatedBy: "b"}, second.order(t))
	assert.False(t, second.replayed())
	unkeyed := redisExDo(t, http.MethodPost, a+"/orders", "", book)
	require.Equal(t, http.StatusCreated, unkeyed.status)
	assert.Len(t, redisExOrders(t, b), 3)
}

func TestRedisExampleConcurrentDuplicates(t *testing.T) {
	m := miniredis.RunT(t)
	urls := []string{redisExInstance(t, m.Addr(), "a"), redisExInstance(t, m.Addr(), "b")}
	const n = 20
	statuses := make([]int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, urls[i%2]+"/orders", strings.NewReader(`{"item":"book","quantity":1}`))
			if !assert.NoError(t, err) {
				return
			}
			req.Header.Set("Idempotency-Key", "same")
			resp, err := http.DefaultClient.Do(req)
			if !assert.NoError(t, err) {
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			statuses[i] = resp.StatusCode
		})
	}
	wg.Wait()
	for i, s := range statuses {
		assert.Contains(t, []int{http.StatusCreated, http.StatusConflict}, s, "request %d", i)
	}
	assert.Len(t, redisExOrders(t, urls[0]), 1, "one order, whichever instance ran it")
}

func TestRedisExampleNewClient(t *testing.T) {
	tests := []struct {
		name   string
		addrs  []string
		master string
		check  func(t *testing.T, c redis.UniversalClient)
	}{
		{"one address", []string{"127.0.0.1:6379"}, "", func(t *testing.T, c redis.UniversalClient) {
			require.IsType(t, &redis.Client{}, c)
			assert.True(t, c.(*redis.Client).Options().ContextTimeoutEnabled)
		}},
		{"cluster seeds", []string{"127.0.0.1:7000", "127.0.0.1:7001"}, "", func(t *testing.T, c redis.UniversalClient) {
			require.IsType(t, &redis.ClusterClient{}, c)
			assert.True(t, c.(*redis.ClusterClient).Options().ContextTimeoutEnabled)
		}},
		{"sentinel", []string{"127.0.0.1:26379"}, "mymaster", func(t *testing.T, c redis.UniversalClient) {
			require.IsType(t, &redis.Client{}, c)
			assert.True(t, c.(*redis.Client).Options().ContextTimeoutEnabled)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newClient(tt.addrs, tt.master)
			t.Cleanup(func() { _ = c.Close() })
			tt.check(t, c)
		})
	}
}
