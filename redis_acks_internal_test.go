package idempotency

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
)

func TestRedisReplicaAcksCheckStoreTimeout(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = client.Close() })

	assert.NotPanics(t, func() { NewRedisStore(client).checkStoreTimeout(time.Millisecond) })
	store := NewRedisStore(client, WithReplicaAcks(1, time.Second))
	assert.NotPanics(t, func() { store.checkStoreTimeout(2 * time.Second) })
	assert.PanicsWithValue(t, "idempotency: the WithReplicaAcks timeout (1s) must be shorter than StoreTimeout (1s)",
		func() { store.checkStoreTimeout(time.Second) })
}
