package idempotency

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"sync"
)

// errHandlerReturned is what a handler's response writer or request body
// returns when it is used after the handler returned.
var errHandlerReturned = errors.New("idempotency: response writer or request body used after the handler returned")

// handlerView is what a handler holds instead of the pooled recorder and
// body fingerprint of its flight: a response writer and a request body that
// go dead when the handler returns. A goroutine that wrongly keeps using
// them afterwards gets errHandlerReturned, and can never reach the request
// that reuses the pooled state. It lives in the request's leaseContext, so
// it costs no allocation of its own.
type handlerView struct {
	w viewWriter
	b viewBody
}

// init points the view at f's recorder and body fingerprint.
func (v *handlerView) init(rec *recorder, fp *bodyFingerprint) {
	v.w.rec, v.b.fp = rec, fp
}

// cut detaches the view from the flight, waiting for any call in progress.
func (v *handlerView) cut() {
	v.w.mu.Lock()
	v.w.rec = nil
	v.w.mu.Unlock()
	v.b.mu.Lock()
	v.b.fp = nil
	v.b.mu.Unlock()
}

// viewWriter is the handler's http.ResponseWriter. It keeps the recorder's
// capabilities (Flush, Hijack, full duplex, Unwrap for
// http.ResponseController) and nothing more.
type viewWriter struct {
	mu  sync.Mutex // held for each call, so cut waits for a call under way
	rec *recorder  // nil once the handler returned
}

func (w *viewWriter) Header() http.Header {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec == nil {
		return http.Header{}
	}
	return w.rec.Header()
}

func (w *viewWriter) WriteHeader(code int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec != nil {
		w.rec.WriteHeader(code)
	}
}

func (w *viewWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec == nil {
		return 0, errHandlerReturned
	}
	return w.rec.Write(p)
}

func (w *viewWriter) WriteString(s string) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec == nil {
		return 0, errHandlerReturned
	}
	return w.rec.WriteString(s)
}

func (w *viewWriter) Flush() { _ = w.FlushError() }

func (w *viewWriter) FlushError() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec == nil {
		return errHandlerReturned
	}
	return w.rec.FlushError()
}

func (w *viewWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec == nil {
		return nil, nil, errHandlerReturned
	}
	return w.rec.Hijack()
}

func (w *viewWriter) EnableFullDuplex() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec == nil {
		return errHandlerReturned
	}
	return w.rec.EnableFullDuplex()
}

// Unwrap returns the writer the recorder wraps, for
// http.ResponseController, or nil once the handler returned.
func (w *viewWriter) Unwrap() http.ResponseWriter {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec == nil {
		return nil
	}
	return w.rec.Unwrap()
}

// viewBody is the handler's request body. It has its own lock, so a
// full-duplex handler can read and write at the same time.
type viewBody struct {
	mu sync.Mutex
	fp *bodyFingerprint // nil once the handler returned
}

func (b *viewBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fp == nil {
		return 0, errHandlerReturned
	}
	return b.fp.Read(p)
}

func (b *viewBody) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fp == nil {
		return nil
	}
	return b.fp.Close()
}
