package idempotency

import (
	"encoding/binary"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unsafe"
)

// The record encoding, version 1, in which both stores of this package keep
// records. Every value starts with a fixed header that the Redis scripts
// read without decoding the rest:
//
//	version   1 byte, recordVersion
//	state     1 byte, StateInFlight or StateCompleted
//	token     1 byte length n, then n bytes
//
// An in-flight record ends there. A completed record goes on with its
// payload, where every number is an unsigned varint and every string or
// byte slice is its varint length followed by its bytes:
//
//	status code
//	not-stored reason
//	header names count, header values count (all names together)
//	per name: name, values count, values (in order)
//	fingerprint
//	body, which ends the value
//
// The strings come before the byte slices, so that a decoder can copy the
// fingerprint and the body into one slice.
//
// The middleware writes this encoding straight from its recorder, and
// replays a record from it in place (recordView), so that neither a first
// execution nor a replay on a store of this package builds a [Record].
const (
	recordVersion     = 1
	recordHeaderLen   = 3
	recordMaxTokenLen = 255
)

// encodeRecord encodes rec, completed by token, in one allocation.
func encodeRecord(token string, rec *Record) string {
	r := &rec.Response
	nValues := 0
	size := recordHeaderLen + len(token) + 3*binary.MaxVarintLen64 +
		recordStringLen(len(r.NotStored)) + recordStringLen(len(rec.Fingerprint)) + recordStringLen(len(r.Body))
	for name, values := range r.Header {
		nValues += len(values)
		size += recordStringLen(len(name)) + binary.MaxVarintLen64
		for _, v := range values {
			size += recordStringLen(len(v))
		}
	}
	b := make([]byte, 0, size)
	b = appendRecordStart(b, token, r.StatusCode, r.NotStored, len(r.Header), nValues)
	for name, values := range r.Header {
		b = appendHeaderField(b, name, values)
	}
	b = appendRecordEnd(b, rec.Fingerprint, r.Body)
	// b is never written again: the string may share its bytes, as
	// strings.Builder does.
	return unsafe.String(unsafe.SliceData(b), len(b))
}

// recordStringLen bounds the encoded size of a string or byte slice of n
// bytes: its length and the bytes.
func recordStringLen(n int) int { return binary.MaxVarintLen64 + n }

// appendRecordStart appends the record header of a record completed by
// token and the fields that come before its header fields. nNames and
// nValues count the header fields and their values that follow.
func appendRecordStart(dst []byte, token string, status int, notStored string, nNames, nValues int) []byte {
	dst = append(dst, recordVersion, byte(StateCompleted), byte(len(token)))
	dst = append(dst, token...)
	dst = binary.AppendUvarint(dst, uint64(status))
	dst = appendRecordString(dst, notStored)
	dst = binary.AppendUvarint(dst, uint64(nNames))
	return binary.AppendUvarint(dst, uint64(nValues))
}

// appendHeaderField appends one header field: its name and its values.
func appendHeaderField(dst []byte, name string, values []string) []byte {
	dst = appendRecordString(dst, name)
	dst = binary.AppendUvarint(dst, uint64(len(values)))
	for _, v := range values {
		dst = appendRecordString(dst, v)
	}
	return dst
}

// appendRecordEnd appends the fingerprint and the body, which end a
// completed record.
func appendRecordEnd(dst []byte, fingerprint, body []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(fingerprint)))
	dst = append(dst, fingerprint...)
	dst = binary.AppendUvarint(dst, uint64(len(body)))
	return append(dst, body...)
}

func appendRecordString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// decodeRecord decodes a record as the claim and get scripts return it: the
// value, followed for an in-flight record by its remaining lease in
// milliseconds, in decimal. Every error wraps ErrCorruptRecord.
//
// It allocates the record, the header map, one slice for all header
// values, and one byte slice that the fingerprint and the body share; the
// strings of the record are substrings of v.
func decodeRecord(v string) (*Record, error) {
	state, tokenEnd, err := readRecordHeader(v)
	if err != nil {
		return nil, err
	}
	switch state {
	case StateInFlight:
		// The script appended the lease; a PTTL of -1 (no expiry, which
		// the Redis store never sets) reads as "cannot tell".
		rest := v[tokenEnd:]
		ms, err := strconv.ParseInt(rest, 10, 64)
		if err != nil || ms > int64(math.MaxInt64/time.Millisecond) {
			return nil, corruptRecord("in-flight record followed by %d bytes that are not its lease", len(rest))
		}
		rec := &Record{State: StateInFlight, Token: v[recordHeaderLen:tokenEnd]}
		if ms > 0 {
			rec.LeaseRemaining = time.Duration(ms) * time.Millisecond
		}
		return rec, nil
	case StateCompleted:
		rv, err := parseCompleted(v, tokenEnd)
		if err != nil {
			return nil, err
		}
		return rv.record(), nil
	}
	return nil, corruptRecord("unknown state %d", v[1])
}

// readRecordHeader checks the fixed header of the record value v and
// returns its state byte, unchecked, and where its token ends.
func readRecordHeader(v string) (state State, tokenEnd int, err error) {
	if len(v) < recordHeaderLen {
		return 0, 0, corruptRecord("value of %d bytes is shorter than the record header", len(v))
	}
	if v[0] != recordVersion {
		return 0, 0, corruptRecord("unknown version %d", v[0])
	}
	tokenEnd = recordHeaderLen + int(v[2])
	if tokenEnd > len(v) {
		return 0, 0, corruptRecord("truncated token")
	}
	return State(v[1]), tokenEnd, nil
}

// recordView is a completed record read in place: its parts are
// substrings of its encoding, checked once by parseCompleted, so that a
// replay reads what it needs without copying the record.
type recordView struct {
	enc         string
	token       string
	status      int
	notStored   string
	notStoredAt int // offset of notStored in enc
	nNames      int
	nValues     int
	headerStart int // offset in enc of the first header field
	headerEnd   int // offset in enc just after the last header field
	fingerprint string
	body        string
}

// viewRecord reads v, the encoding of a completed record, in place. Every
// error wraps ErrCorruptRecord.
func viewRecord(v string) (recordView, error) {
	state, tokenEnd, err := readRecordHeader(v)
	if err != nil {
		return recordView{}, err
	}
	if state != StateCompleted {
		return recordView{}, corruptRecord("state %d where a completed record was expected", v[1])
	}
	return parseCompleted(v, tokenEnd)
}

// parseCompleted checks the payload of a completed record v whose token
// ends at tokenEnd, and returns its view.
func parseCompleted(v string, tokenEnd int) (recordView, error) {
	d := recordDecoder{s: v, off: tokenEnd}
	status := d.uvarint()
	notStoredStart, notStoredEnd := d.span()
	nNames := d.uvarint()
	nValues := d.uvarint()
	if d.err != nil {
		return recordView{}, d.err
	}
	// Every name and value takes at least one byte: counts larger than
	// what is left are corrupt, and must not size an allocation.
	if nNames > uint64(len(v)-d.off) || nValues > uint64(len(v)-d.off) ||
		status > 999 || (status < 200 && status != http.StatusSwitchingProtocols) {
		return recordView{}, corruptRecord("implausible counts")
	}

	headerStart := d.off
	var seen uint64
	for range nNames {
		d.span()
		n := d.uvarint()
		if d.err == nil && n > uint64(len(v)-d.off) {
			return recordView{}, corruptRecord("implausible counts")
		}
		for range n {
			if d.span(); d.err != nil {
				return recordView{}, d.err
			}
		}
		seen += n
		if d.err != nil {
			return recordView{}, d.err
		}
	}
	if seen != nValues {
		return recordView{}, corruptRecord("header value count mismatch")
	}
	headerEnd := d.off
	fpStart, fpEnd := d.span()
	bodyStart, bodyEnd := d.span()
	if d.err != nil {
		return recordView{}, d.err
	}
	if bodyEnd != len(v) {
		return recordView{}, corruptRecord("%d bytes after the body", len(v)-bodyEnd)
	}
	return recordView{
		enc:         v,
		token:       v[recordHeaderLen:tokenEnd],
		status:      int(status),
		notStored:   v[notStoredStart:notStoredEnd],
		notStoredAt: notStoredStart,
		nNames:      int(nNames),
		nValues:     int(nValues),
		headerStart: headerStart,
		headerEnd:   headerEnd,
		fingerprint: v[fpStart:fpEnd],
		body:        v[bodyStart:bodyEnd],
	}, nil
}

// fields returns a cursor over the header fields of rv.
func (rv *recordView) fields() fieldCursor {
	return fieldCursor{d: recordDecoder{s: rv.enc, off: rv.headerStart}, left: rv.nNames}
}

// first returns the first value of the header field named exactly name,
// or "".
func (rv *recordView) first(name string) string {
	c := rv.fields()
	for {
		n, count, ok := c.next()
		if !ok {
			return ""
		}
		if n == name && count > 0 {
			return c.value()
		}
		for range count {
			c.value()
		}
	}
}

// detachedRecord is record for a caller whose encoding is about to go (the
// middleware's reused buffer), handing the record to a store that may keep
// it: the record's strings come from one new copy of the encoding up to the
// end of the header fields, so that keeping the token or a header does not
// keep a second copy of the body.
func (rv *recordView) detachedRecord() *Record {
	d := *rv
	d.enc = strings.Clone(rv.enc[:rv.headerEnd])
	d.token = d.enc[recordHeaderLen : recordHeaderLen+len(rv.token)]
	d.notStored = d.enc[rv.notStoredAt : rv.notStoredAt+len(rv.notStored)]
	return d.record()
}

// record returns rv decoded into a new Record. The strings of the record
// are substrings of the encoding; the fingerprint and the body share one
// new byte slice. A header field with no values is nil, present and empty.
func (rv *recordView) record() *Record {
	rec := &Record{
		State: StateCompleted,
		Token: rv.token,
		Response: Response{
			StatusCode: rv.status,
			NotStored:  rv.notStored,
		},
	}
	if rv.nNames > 0 {
		h := make(http.Header, rv.nNames)
		all := make([]string, rv.nValues)
		c := rv.fields()
		for {
			name, n, ok := c.next()
			if !ok {
				break
			}
			if n == 0 {
				h[name] = nil
				continue
			}
			values := all[:n:n]
			all = all[n:]
			for i := range values {
				values[i] = c.value()
			}
			h[name] = values
		}
		rec.Response.Header = h
	}
	if len(rv.fingerprint) > 0 || len(rv.body) > 0 {
		// One slice for the fingerprint and the body.
		buf := make([]byte, 0, len(rv.fingerprint)+len(rv.body))
		buf = append(buf, rv.fingerprint...)
		buf = append(buf, rv.body...)
		fpLen := len(rv.fingerprint)
		if fpLen > 0 {
			rec.Fingerprint = buf[:fpLen:fpLen]
		}
		if len(buf) > fpLen {
			rec.Response.Body = buf[fpLen:]
		}
	}
	return rec
}

// fieldCursor walks the header fields of a checked record: next moves to
// the next field, then value returns its values one by one, each exactly
// as many times as next said.
type fieldCursor struct {
	d    recordDecoder
	left int
}

// next returns the name of the next field and how many values it has, or
// ok false after the last one.
func (c *fieldCursor) next() (name string, values int, ok bool) {
	if c.left == 0 {
		return "", 0, false
	}
	c.left--
	start, end := c.d.span()
	return c.d.s[start:end], int(c.d.uvarint()), true
}

// value returns the next value of the current field.
func (c *fieldCursor) value() string {
	start, end := c.d.span()
	return c.d.s[start:end]
}

// recordDecoder reads varints and length-prefixed spans from s; the first
// error sticks and makes every later read return zero.
type recordDecoder struct {
	s   string
	off int
	err error
}

func (d *recordDecoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	var x uint64
	for shift := uint(0); shift < 64; shift += 7 {
		if d.off >= len(d.s) {
			d.err = corruptRecord("truncated value")
			return 0
		}
		c := d.s[d.off]
		d.off++
		if c < 0x80 {
			return x | uint64(c)<<shift
		}
		x |= uint64(c&0x7f) << shift
	}
	d.err = corruptRecord("varint overflows")
	return 0
}

// span reads a length and returns the offsets of the bytes it announces.
func (d *recordDecoder) span() (start, end int) {
	n := d.uvarint()
	if d.err != nil {
		return d.off, d.off
	}
	if n > uint64(len(d.s)-d.off) {
		d.err = corruptRecord("truncated value")
		return d.off, d.off
	}
	start = d.off
	d.off += int(n)
	return start, d.off
}

func corruptRecord(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorruptRecord, fmt.Sprintf(format, args...))
}
