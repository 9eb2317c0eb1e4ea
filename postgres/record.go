package postgres

import (
	"encoding/binary"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"time"

	"github.com/f8e778d0/idempotency"
)

// recordRow is one row as Claim and Get read it. Every column is nullable
// here: an in-flight row has no response, and Claim's statement returns
// NULLs when it found nothing to report.
type recordRow struct {
	version     *int16
	token       *string
	state       *int16
	status      *int32
	header      []byte
	body        []byte
	fingerprint []byte
	notStored   *string
	remaining   *int64 // microseconds of life left, positive
}

// dest returns the scan destinations of r's columns, in the order of
// getSQL.
func (r *recordRow) dest() []any {
	return []any{&r.version, &r.token, &r.state, &r.status,
		&r.header, &r.body, &r.fingerprint, &r.notStored, &r.remaining}
}

// responseColumns returns the status, header and not-stored reason of resp
// as the record's columns hold them, or why they cannot hold them.
func responseColumns(resp *idempotency.Response) (status int32, header []byte, notStored *string, err error) {
	if resp.StatusCode < 0 || resp.StatusCode > 999 {
		return 0, nil, nil, fmt.Errorf("postgres: status code %d out of range", resp.StatusCode)
	}
	if resp.NotStored != "" {
		if err := checkText("not-stored reason", resp.NotStored); err != nil {
			return 0, nil, nil, err
		}
		notStored = &resp.NotStored
	}
	return int32(resp.StatusCode), encodeHeader(resp.Header), notStored, nil
}

// record decodes r. A row of an unknown version or state, or whose header
// column does not decode, is an error wrapping
// [idempotency.ErrCorruptRecord].
func (r *recordRow) record() (*idempotency.Record, error) {
	if r.version == nil || *r.version != recordVersion {
		v := "NULL"
		if r.version != nil {
			v = fmt.Sprint(*r.version)
		}
		return nil, fmt.Errorf("%w: row of version %s, want %d", idempotency.ErrCorruptRecord, v, recordVersion)
	}
	if r.token == nil || r.state == nil || r.remaining == nil {
		return nil, fmt.Errorf("%w: row without token, state or expiry", idempotency.ErrCorruptRecord)
	}
	switch idempotency.State(*r.state) {
	case idempotency.StateInFlight:
		return &idempotency.Record{
			State:          idempotency.StateInFlight,
			Token:          *r.token,
			LeaseRemaining: time.Duration(*r.remaining) * time.Microsecond,
		}, nil
	case idempotency.StateCompleted:
		if r.status == nil {
			return nil, fmt.Errorf("%w: completed row without a status", idempotency.ErrCorruptRecord)
		}
		header, err := decodeHeader(r.header)
		if err != nil {
			return nil, err
		}
		rec := &idempotency.Record{
			State:       idempotency.StateCompleted,
			Token:       *r.token,
			Fingerprint: r.fingerprint,
			Response: idempotency.Response{
				StatusCode: int(*r.status),
				Header:     header,
				Body:       r.body,
			},
		}
		if r.notStored != nil {
			rec.Response.NotStored = *r.notStored
		}
		return rec, nil
	}
	return nil, fmt.Errorf("%w: row in state %d", idempotency.ErrCorruptRecord, *r.state)
}

// The header column holds a response header as bytea, in a layout where
// every number is an unsigned varint and every string is its varint length
// followed by its bytes:
//
//	number of names
//	per name, in sorted order: the name, its number of values, the values
//
// Values keep their order and are never split or joined, so multi-valued
// headers and values containing commas replay as they were written. A nil
// header is stored as NULL. Bytes, rather than jsonb, because a header
// value may hold bytes that are not UTF-8, which jsonb refuses.

// encodeHeader returns h in the layout above, or nil when h is nil.
func encodeHeader(h http.Header) []byte {
	if h == nil {
		return nil
	}
	size := binary.MaxVarintLen64
	for name, values := range h {
		size += 2*binary.MaxVarintLen64 + len(name)
		for _, v := range values {
			size += binary.MaxVarintLen64 + len(v)
		}
	}
	b := make([]byte, 0, size)
	b = binary.AppendUvarint(b, uint64(len(h)))
	for _, name := range slices.Sorted(maps.Keys(h)) {
		values := h[name]
		b = appendString(b, name)
		b = binary.AppendUvarint(b, uint64(len(values)))
		for _, v := range values {
			b = appendString(b, v)
		}
	}
	return b
}

// decodeHeader reverses encodeHeader. NULL decodes as nil.
func decodeHeader(b []byte) (http.Header, error) {
	if b == nil {
		return nil, nil
	}
	d := headerDecoder{b: b}
	n := d.count()
	h := make(http.Header, n)
	for range n {
		name := d.string()
		nv := d.count()
		if d.err != nil {
			break
		}
		values := make([]string, nv)
		for i := range values {
			values[i] = d.string()
		}
		h[name] = values
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("trailing bytes")
	}
	if d.err != nil {
		return nil, d.err
	}
	return h, nil
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// headerDecoder reads the header layout, remembering the first error.
type headerDecoder struct {
	b   []byte
	err error
}

func (d *headerDecoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: header column: %s", idempotency.ErrCorruptRecord, what)
	}
	d.b = nil
}

func (d *headerDecoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad length")
		return 0
	}
	d.b = d.b[n:]
	return v
}

// count reads a number of items, each of which takes at least one byte, so
// that a corrupt count cannot make the decoder allocate more than the
// column holds.
func (d *headerDecoder) count() int {
	v := d.uvarint()
	if v > uint64(len(d.b)) {
		d.fail("count larger than the column")
		return 0
	}
	return int(v)
}

func (d *headerDecoder) string() string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail("string longer than the column")
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}
