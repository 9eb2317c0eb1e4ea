package postgres

import "net/http"

// TxStatements returns what the one-transaction mode sends for s's table,
// for BenchmarkTx's handler that sends the same without the middleware:
// the try-lock and the key it takes for key, the look-up, the removal of
// an expired row and the record insert.
func (s *Store) TxStatements(key string) (lock string, lockKey int64, lookup, takeOver, insert string) {
	return lockSQL, s.lockKey(key), s.getSQL, s.takeOverSQL, s.insertSQL
}

// EncodeHeader is encodeHeader, for the same handler.
func EncodeHeader(h http.Header) []byte { return encodeHeader(h) }
