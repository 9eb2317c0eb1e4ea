package idempotency

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"
)

// fuzzRecordReader builds values from the fuzz input, and zeros once it is
// used up.
type fuzzRecordReader struct{ p []byte }

func (r *fuzzRecordReader) byte() byte {
	if len(r.p) == 0 {
		return 0
	}
	b := r.p[0]
	r.p = r.p[1:]
	return b
}

func (r *fuzzRecordReader) bytes(max int) []byte {
	n := min(int(r.byte())%(max+1), len(r.p))
	b := r.p[:n]
	r.p = r.p[n:]
	return b
}

// fuzzRecordFrom builds a token and a completed record from data. The
// fields a store never sees empty but nil are normalised so that the
// decoded record compares equal.
func fuzzRecordFrom(data []byte) (string, *Record) {
	r := &fuzzRecordReader{p: data}
	token := string(r.bytes(recordMaxTokenLen))
	rec := &Record{State: StateCompleted, Token: token}
	rec.Response.StatusCode = 200 + int(binary.BigEndian.Uint16([]byte{r.byte(), r.byte()}))%800
	rec.Response.NotStored = string(r.bytes(16))
	if n := int(r.byte() % 6); n > 0 {
		rec.Response.Header = http.Header{}
		for range n {
			name := string(r.bytes(12))
			values := make([]string, r.byte()%4)
			for i := range values {
				values[i] = string(r.bytes(40))
			}
			rec.Response.Header[name] = values
		}
	}
	if fp := r.bytes(40); len(fp) > 0 {
		rec.Fingerprint = bytes.Clone(fp)
	}
	if len(r.p) > 0 {
		rec.Response.Body = bytes.Clone(r.p)
	}
	return token, rec
}

// FuzzRedisRecord checks the Redis store's record encoding: decoding any
// bytes never panics and gives either a record or an error wrapping
// ErrCorruptRecord; a decoded record, of version 1 or 2, encodes again as
// version 2 to a value that decodes to the same record; and records built
// from the input round-trip through encode and decode.
func FuzzRedisRecord(f *testing.F) {
	full := &Record{
		Fingerprint: []byte{1, 2, 3, 4},
		Response: Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Content-Type": {"application/json"}, "Link": {"<a>, <b>", "<c>"}, "X-Empty": {""}},
			Body:       []byte(`{"id":1}`),
		},
	}
	notStored := &Record{Response: Response{StatusCode: http.StatusCreated, NotStored: "too large", Header: http.Header{"Location": {"/o/1"}}}}
	for _, seed := range []string{
		"",
		"\x02",
		"\x02\x01\x03abc",
		"\x01\x01\x03abc",
		"\x02\x01\x02t",
		"\x02\x01\x01t1500",
		"\x02\x02\x01t\xc8\x01\x00\x00\x00\x00\x00",
		"\x01\x02\x01t\xc8\x01\x00\x00\x00\x00\x00",
		"\x02\x02\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
		"\x03\x02\x00",
		"\x02\x03\x00",
		"\x02\x02\x00\xc8\x01\x00\x80\x80\x80\x80\x10\x01",
		redisVersion1Completed,
		encodeRecord("tok", full),
		encodeRecord("", notStored),
		encodeRecord("t", &Record{Response: Response{StatusCode: http.StatusNoContent}}),
		encodeRecord("tok", full)[:20],
		encodeRecord("tok", full) + "x",
	} {
		f.Add([]byte(seed))
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		// Decode of arbitrary bytes.
		rec, err := decodeRecord(string(data))
		switch {
		case err != nil && rec != nil:
			t.Fatalf("decode returned both a record and %v", err)
		case err != nil:
			if !errors.Is(err, ErrCorruptRecord) {
				t.Fatalf("decode error %v does not wrap ErrCorruptRecord", err)
			}
		case rec == nil:
			t.Fatal("decode returned neither a record nor an error")
		case data[0] != recordVersion && data[0] != recordVersion1:
			t.Fatalf("decode accepted version %d", data[0])
		case rec.State == StateInFlight:
			if len(data) != recordHeaderLen+len(rec.Token) || rec.LeaseRemaining != 0 || rec.Fingerprint != nil {
				t.Fatalf("in-flight record %+v from %d bytes", rec, len(data))
			}
		case rec.State == StateCompleted:
			// A completed record is replayed with its status, which must
			// be one a handler can have written last: anything else
			// would make the replay's WriteHeader panic or turn a 1xx
			// into a final status.
			if s := rec.Response.StatusCode; s != http.StatusSwitchingProtocols && (s < 200 || s > 999) {
				t.Fatalf("decode accepted a completed record with status %d", s)
			}
			value := encodeRecord(rec.Token, rec)
			if value[0] != recordVersion {
				t.Fatalf("re-encoded as version %d", value[0])
			}
			again, err := decodeRecord(value)
			if err != nil {
				t.Fatalf("re-encoding a decoded record: %v", err)
			}
			fuzzRecordEqual(t, rec, again)
		default:
			t.Fatalf("decode returned a record in state %d", rec.State)
		}

		// Round trip of a record built from the input.
		token, built := fuzzRecordFrom(data)
		got, err := decodeRecord(encodeRecord(token, built))
		if err != nil {
			t.Fatalf("decoding an encoded record: %v", err)
		}
		fuzzRecordEqual(t, built, got)
	})
}

// fuzzRecordEqual fails t unless the two completed records hold the same
// data, with nil and empty slices and maps counted as equal.
func fuzzRecordEqual(t *testing.T, want, got *Record) {
	t.Helper()
	if got.State != StateCompleted || got.Token != want.Token ||
		got.Response.StatusCode != want.Response.StatusCode || got.Response.NotStored != want.Response.NotStored ||
		!bytes.Equal(got.Fingerprint, want.Fingerprint) || !bytes.Equal(got.Response.Body, want.Response.Body) ||
		!redisHeadersEqual(want.Response.Header, got.Response.Header) {
		t.Fatalf("record round trip:\nwant %+v\ngot  %+v", want, got)
	}
	if got.LeaseRemaining != 0 {
		t.Fatalf("completed record with lease %v", got.LeaseRemaining)
	}
}

// redisHeadersEqual reports whether a and b have the same names with the
// same values in order, a nil and an empty list of values counted as equal.
func redisHeadersEqual(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for name, av := range a {
		bv, ok := b[name]
		if !ok || !slices.Equal(av, bv) {
			return false
		}
	}
	return true
}

// TestRedisRecordDecodeRejectsImpossibleStatus: a completed record is
// replayed with its status, so one that no handler can have written last
// (0, a 1xx other than 101, more than 999) is corrupt. Accepting it would
// make the replay's WriteHeader panic (below 100) or send a 1xx followed
// by an implied 200.
func TestRedisRecordDecodeRejectsImpossibleStatus(t *testing.T) {
	for _, status := range []int{0, 1, 48, 99, 100, 103, 199, 1000, 4000} {
		value := encodeRecord("tok", &Record{Response: Response{StatusCode: status}})
		rec, err := decodeRecord(value)
		if err == nil {
			t.Errorf("status %d: decoded as a record with status %d, want ErrCorruptRecord", status, rec.Response.StatusCode)
			continue
		}
		if !errors.Is(err, ErrCorruptRecord) {
			t.Errorf("status %d: error %v does not wrap ErrCorruptRecord", status, err)
		}
	}
	for _, status := range []int{101, 200, 204, 599, 999} {
		value := encodeRecord("tok", &Record{Response: Response{StatusCode: status}})
		if _, err := decodeRecord(value); err != nil {
			t.Errorf("status %d: %v", status, err)
		}
	}
}

// TestRedisRecordDecodeHugeValueCountFailsFast: a corrupt record that
// announces billions of values for one header name must be refused at
// once, not walked value by value.
func TestRedisRecordDecodeHugeValueCountFailsFast(t *testing.T) {
	value := "\x02\x02\x00\xc8\x01\ttoo large\x01\x01\bLocation\x9e\x9e\x9e\x9e\x9e\x01\x04/o/1\x00\x00"
	done := make(chan error, 1)
	go func() {
		_, err := decodeRecord(value)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrCorruptRecord) {
			t.Fatalf("decode: %v, want ErrCorruptRecord", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("decoding a record with a huge header value count did not return within 5s")
	}
}
