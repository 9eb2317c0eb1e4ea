package idempotency

import (
	"net/http"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// redisInFlightReply builds an in-flight record as the claim and get
// scripts return it: the value they store, then the lease in decimal.
func redisInFlightReply(token string, leaseMillis int64) string {
	return string([]byte{recordVersion, byte(StateInFlight), byte(len(token))}) + token +
		strconv.FormatInt(leaseMillis, 10)
}

func TestRedisRecordRoundTrip(t *testing.T) {
	body := []byte{0, 1, 2, 0xff, 0xfe, '{', '}', 0x80}
	tests := []struct {
		name  string
		token string
		rec   Record
	}{
		{
			name:  "full",
			token: "tok-1",
			rec: Record{
				Fingerprint: []byte{0xde, 0xad, 0xbe, 0xef, 0},
				Response: Response{
					StatusCode: http.StatusCreated,
					Header: http.Header{
						"Content-Type": {"application/json"},
						"Link":         {"<a>; rel=next", "<b>; rel=prev", "<c>, <d>"},
						"X-Empty":      {""},
					},
					Body: body,
				},
			},
		},
		{
			name:  "no header, no body, no fingerprint",
			token: "t",
			rec:   Record{Response: Response{StatusCode: http.StatusNoContent}},
		},
		{
			name:  "not stored",
			token: "tok-2",
			rec: Record{
				Response: Response{
					StatusCode: http.StatusCreated,
					Header:     http.Header{"Location": {"/orders/1"}},
					NotStored:  "too large",
				},
			},
		},
		{
			name:  "empty token",
			token: "",
			rec:   Record{Response: Response{StatusCode: http.StatusOK, Body: []byte("ok")}},
		},
		{
			name:  "longest token, large body",
			token: string(make([]byte, recordMaxTokenLen)),
			rec:   Record{Response: Response{StatusCode: http.StatusOK, Body: make([]byte, 1<<20)}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			encoded := encodeRecord(tt.token, &tt.rec)
			assert.NotEmpty(t, encoded)

			got, err := decodeRecord(string(encoded))
			require.NoError(t, err)
			want := tt.rec
			want.State = StateCompleted
			want.Token = tt.token
			assert.Equal(t, &want, got)
		})
	}
}

func TestRedisRecordBodyIsRaw(t *testing.T) {
	body := []byte("\x00raw body bytes\xff")
	encoded := encodeRecord("tok", &Record{Response: Response{StatusCode: 200, Body: body}})
	assert.Equal(t, string(body), encoded[len(encoded)-len(body):], "the body ends the value byte for byte")
	assert.Equal(t, string([]byte{recordVersion, byte(StateCompleted), 3, 't', 'o', 'k'}), encoded[:6],
		"the fixed header leads the value")
}

func TestRedisRecordDecodeInFlight(t *testing.T) {
	tests := []struct {
		name  string
		reply string
		want  *Record
	}{
		{"lease", redisInFlightReply("tok", 1500), &Record{State: StateInFlight, Token: "tok", LeaseRemaining: 1500_000_000}},
		{"no expiry", redisInFlightReply("tok", -1), &Record{State: StateInFlight, Token: "tok"}},
		{"empty token", redisInFlightReply("", 7), &Record{State: StateInFlight, LeaseRemaining: 7_000_000}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeRecord(tt.reply)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestRedisRecordDecodeCorrupt(t *testing.T) {
	good := string(encodeRecord("tok", &Record{
		Fingerprint: []byte("fp"),
		Response: Response{
			StatusCode: 200,
			Header:     http.Header{"A": {"1", "2"}},
			Body:       []byte("body"),
		},
	}))
	tests := map[string]string{
		"empty":                 "",
		"short header":          "\x01\x02",
		"unknown version":       "\x07" + good[1:],
		"version zero":          "\x00" + good[1:],
		"unknown state":         good[:1] + "\x09" + good[2:],
		"token past the end":    "\x01\x01\x09tok",
		"in flight, no lease":   "\x01\x01\x03tok",
		"in flight, bad lease":  "\x01\x01\x03tok12x",
		"json":                  `{"state":"completed"}`,
		"truncated payload":     good[:len(good)-1],
		"trailing bytes":        good + "x",
		"payload cut after tok": good[:6],
		"huge header count":     "\x01\x02\x03tok\xc8\x01\x00\xff\xff\xff\xff\x0f\x00",
		"varint overflow":       "\x01\x02\x03tok\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
	}
	for name, value := range tests {
		t.Run(name, func(t *testing.T) {
			rec, err := decodeRecord(value)
			require.ErrorIs(t, err, ErrCorruptRecord)
			assert.Nil(t, rec)
		})
	}
}

func TestRedisRecordDecodeAllocations(t *testing.T) {
	encoded := string(encodeRecord("0123456789abcdef0123456789abcdef", &Record{
		Fingerprint: make([]byte, 32),
		Response: Response{
			StatusCode: 201,
			Header: http.Header{
				"Content-Type": {"application/json"},
				"Location":     {"/orders/42"},
				"Link":         {"<a>", "<b>"},
			},
			Body: make([]byte, 512),
		},
	}))
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := decodeRecord(encoded); err != nil {
			t.Fatal(err)
		}
	})
	// The record, the values slice, the byte slice, and the header map
	// (which may take two).
	assert.LessOrEqual(t, allocs, 5.0)
}

func TestRecordViewReadsInPlace(t *testing.T) {
	rec := &Record{
		Fingerprint: []byte("fp"),
		Response: Response{
			StatusCode: http.StatusCreated,
			NotStored:  "",
			Header:     http.Header{"Location": {"/orders/1", "/other"}, "Link": {"<a>"}},
			Body:       []byte("body"),
		},
	}
	encoded := encodeRecord("tok", rec)
	var rv recordView
	allocs := testing.AllocsPerRun(100, func() {
		var err error
		if rv, err = viewRecord(encoded); err != nil {
			t.Fatal(err)
		}
	})
	assert.Zero(t, allocs, "a view copies nothing")
	assert.Equal(t, "tok", rv.token)
	assert.Equal(t, http.StatusCreated, rv.status)
	assert.Equal(t, "fp", rv.fingerprint)
	assert.Equal(t, "body", rv.body)
	assert.Equal(t, "/orders/1", rv.first("Location"), "the first value")
	assert.Empty(t, rv.first("location"), "names are matched exactly, as stored")
	assert.Empty(t, rv.first("X-Absent"))
	assert.Equal(t, rec.Response.Header, rv.record().Response.Header)

	// Only a completed record can be viewed; in-flight replies and corrupt
	// values are errors.
	for name, v := range map[string]string{
		"in flight":  redisInFlightReply("tok", 100),
		"truncated":  encoded[:len(encoded)-1],
		"short":      "\x01",
		"version":    "\x02" + encoded[1:],
		"token past": "\x01\x02\xfftok",
	} {
		_, err := viewRecord(v)
		assert.ErrorIs(t, err, ErrCorruptRecord, name)
	}
}
