package idempotency

import (
	"encoding/binary"
	"fmt"
	"net/http"
	"strings"
)

// The value under which the Redis store keeps a record. It starts with a
// fixed header that the store's scripts read without decoding the rest:
//
//	version   1 byte: recordVersion, or recordVersion1 (still read)
//	state     1 byte: StateInFlight or StateCompleted
//	token     1 byte length n, then the n bytes of the owner token
//
// An in-flight record ends there. A completed record goes on with its
// response, where every number is an unsigned varint and every string is
// its varint length followed by its bytes:
//
//	status code
//	not-stored reason
//	number of header names, number of header values (all names together)
//	per name: the name, its number of values, the values in order
//	fingerprint
//	body, which ends the value
//
// Versions 1 and 2 share this layout. Version 2 came with a new request
// fingerprint rule: a reader that knows only version 1 refuses a version 2
// record as corrupt rather than compare its fingerprint under the old rule.
// A version 1 record is read with its fingerprint as it was written; the
// middleware recognises the old rule by the fingerprint's bytes.
const (
	recordVersion     = 2
	recordVersion1    = 1
	recordHeaderLen   = 3
	recordMaxTokenLen = 255
)

// encodeRecord returns the value of rec as a record completed by token,
// which must be at most recordMaxTokenLen bytes long. rec.State and
// rec.Token are not read.
func encodeRecord(token string, rec *Record) string {
	r := &rec.Response
	nValues := 0
	size := recordHeaderLen + len(token) + 6*binary.MaxVarintLen64 + len(r.NotStored) + len(rec.Fingerprint) + len(r.Body)
	for name, values := range r.Header {
		nValues += len(values)
		size += 2*binary.MaxVarintLen64 + len(name)
		for _, v := range values {
			size += binary.MaxVarintLen64 + len(v)
		}
	}

	var e recordEncoder
	e.b.Grow(size)
	e.b.WriteByte(recordVersion)
	e.b.WriteByte(byte(StateCompleted))
	e.b.WriteByte(byte(len(token)))
	e.b.WriteString(token)
	e.uvarint(uint64(r.StatusCode))
	e.string(r.NotStored)
	e.uvarint(uint64(len(r.Header)))
	e.uvarint(uint64(nValues))
	for name, values := range r.Header {
		e.string(name)
		e.uvarint(uint64(len(values)))
		for _, v := range values {
			e.string(v)
		}
	}
	e.bytes(rec.Fingerprint)
	e.bytes(r.Body)
	return e.b.String()
}

// recordEncoder writes the parts of a record value.
type recordEncoder struct {
	b strings.Builder
}

func (e *recordEncoder) uvarint(x uint64) {
	var buf [binary.MaxVarintLen64]byte
	e.b.Write(binary.AppendUvarint(buf[:0], x))
}

func (e *recordEncoder) string(s string) {
	e.uvarint(uint64(len(s)))
	e.b.WriteString(s)
}

func (e *recordEncoder) bytes(p []byte) {
	e.uvarint(uint64(len(p)))
	e.b.Write(p)
}

// decodeRecord decodes v, a record value of version 1 or 2. Every error
// wraps [ErrCorruptRecord]. An in-flight record comes back without its lease,
// which Redis keeps apart from the value.
func decodeRecord(v string) (*Record, error) {
	if len(v) < recordHeaderLen {
		return nil, corruptRecord("value of %d bytes is shorter than the record header", len(v))
	}
	if v[0] != recordVersion && v[0] != recordVersion1 {
		return nil, corruptRecord("unknown version %d", v[0])
	}
	tokenEnd := recordHeaderLen + int(v[2])
	if tokenEnd > len(v) {
		return nil, corruptRecord("truncated token")
	}
	rec := &Record{State: State(v[1]), Token: v[recordHeaderLen:tokenEnd]}
	switch rec.State {
	case StateInFlight:
		if tokenEnd != len(v) {
			return nil, corruptRecord("%d bytes after an in-flight record", len(v)-tokenEnd)
		}
		return rec, nil
	case StateCompleted:
		d := recordDecoder{s: v, off: tokenEnd}
		if err := d.completed(rec); err != nil {
			return nil, err
		}
		return rec, nil
	}
	return nil, corruptRecord("unknown state %d", v[1])
}

// recordDecoder reads varints and strings from s, starting at off. The
// first error sticks: every later read returns zero.
type recordDecoder struct {
	s   string
	off int
	err error
}

// completed reads the response, fingerprint included, of a completed
// record into rec, and checks that nothing follows it.
func (d *recordDecoder) completed(rec *Record) error {
	r := &rec.Response
	status := d.uvarint()
	r.NotStored = d.string()
	nNames, nValues := d.count(), d.count()
	if d.err == nil && (status > 999 || (status < 200 && status != http.StatusSwitchingProtocols)) {
		// No handler can have written it last: replaying it would make
		// WriteHeader panic or send a 1xx followed by an implied 200.
		return corruptRecord("impossible status %d", status)
	}
	r.StatusCode = int(status)
	if nNames > 0 {
		r.Header = make(http.Header, nNames)
		seen := 0
		for range nNames {
			name := d.string()
			var values []string
			if n := d.count(); n > 0 {
				values = make([]string, n)
				seen += n
			}
			for i := range values {
				values[i] = d.string()
			}
			r.Header[name] = values
		}
		if d.err == nil && seen != nValues {
			return corruptRecord("%d header values where %d were announced", seen, nValues)
		}
	}
	rec.Fingerprint = d.bytes()
	r.Body = d.bytes()
	if d.err != nil {
		return d.err
	}
	if d.off != len(d.s) {
		return corruptRecord("%d bytes after the body", len(d.s)-d.off)
	}
	return nil
}

func (d *recordDecoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	x, n := binary.Uvarint([]byte(d.s[d.off:min(d.off+binary.MaxVarintLen64, len(d.s))]))
	if n <= 0 {
		d.err = corruptRecord("bad varint at offset %d", d.off)
		return 0
	}
	d.off += n
	return x
}

// count reads a number of strings still to come. Each takes at least one
// byte, so a count larger than what is left is corrupt; checking it here
// keeps a corrupt count from sizing an allocation.
func (d *recordDecoder) count() int {
	n := d.uvarint()
	if d.err == nil && n > uint64(len(d.s)-d.off) {
		d.err = corruptRecord("count %d at offset %d is larger than the value", n, d.off)
	}
	if d.err != nil {
		return 0
	}
	return int(n)
}

// string reads a length and returns that many bytes of s.
func (d *recordDecoder) string() string {
	n := d.uvarint()
	if d.err == nil && n > uint64(len(d.s)-d.off) {
		d.err = corruptRecord("truncated value")
	}
	if d.err != nil {
		return ""
	}
	start := d.off
	d.off += int(n)
	return d.s[start:d.off]
}

// bytes is string copied into a new slice, or nil when it is empty.
func (d *recordDecoder) bytes() []byte {
	if s := d.string(); s != "" {
		return []byte(s)
	}
	return nil
}

func corruptRecord(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorruptRecord, fmt.Sprintf(format, args...))
}
