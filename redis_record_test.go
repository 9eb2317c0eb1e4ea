package idempotency

import (
	"math"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// redisVersion1Completed is a completed record of version 1, as a release
// before version 2 wrote it, spelled out byte by byte: token "tok", status
// 201, no not-stored reason, one header field (Location: /o/1),
// fingerprint "fp1" and body "ok".
const redisVersion1Completed = "\x01\x02\x03tok" + "\xc9\x01" + "\x00" + "\x01\x01" +
	"\x08Location\x01\x04/o/1" + "\x03fp1" + "\x02ok"

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

			got, err := decodeRecord(encoded)
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
	assert.Equal(t, "\x02\x02\x03tok", encoded[:6], "the fixed header, version 2, leads the value")
}

func TestRedisRecordDecodeInFlight(t *testing.T) {
	tests := []struct {
		name  string
		value string
		want  *Record
	}{
		{"version 2", "\x02\x01\x03tok", &Record{State: StateInFlight, Token: "tok"}},
		{"version 1", "\x01\x01\x03tok", &Record{State: StateInFlight, Token: "tok"}},
		{"empty token", "\x02\x01\x00", &Record{State: StateInFlight}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeRecord(tt.value)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestRedisRecordReadsVersion1(t *testing.T) {
	got, err := decodeRecord(redisVersion1Completed)
	require.NoError(t, err)
	assert.Equal(t, &Record{
		State:       StateCompleted,
		Token:       "tok",
		Fingerprint: []byte("fp1"),
		Response: Response{
			StatusCode: http.StatusCreated,
			Header:     http.Header{"Location": {"/o/1"}},
			Body:       []byte("ok"),
		},
	}, got, "the fingerprint is passed on as it was written")

	again := encodeRecord(got.Token, got)
	assert.Equal(t, "\x02"+redisVersion1Completed[1:], again, "the layout is the same; the version is 2")
}

func TestRedisRecordDecodeCorrupt(t *testing.T) {
	good := encodeRecord("tok", &Record{
		Fingerprint: []byte("fp"),
		Response: Response{
			StatusCode: 200,
			Header:     http.Header{"A": {"1", "2"}},
			Body:       []byte("body"),
		},
	})
	tests := map[string]string{
		"empty":                   "",
		"short header":            "\x02\x02",
		"unknown version":         "\x03" + good[1:],
		"version zero":            "\x00" + good[1:],
		"version 1 tag, unknown":  "\x31" + good[1:],
		"unknown state":           good[:1] + "\x09" + good[2:],
		"token past the end":      "\x02\x01\x09tok",
		"in flight, trailing":     "\x02\x01\x03tok12",
		"json":                    `{"state":"completed"}`,
		"truncated payload":       good[:len(good)-1],
		"trailing bytes":          good + "x",
		"payload cut after token": good[:6],
		"version 1, truncated":    redisVersion1Completed[:len(redisVersion1Completed)-1],
		"huge header count":       "\x02\x02\x03tok\xc8\x01\x00\xff\xff\xff\xff\x0f\x00",
		"value count mismatch":    "\x02\x02\x03tok\xc8\x01\x00\x01\x02\x01A\x01\x011\x00\x00",
		"varint overflow":         "\x02\x02\x03tok\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
	}
	for name, value := range tests {
		t.Run(name, func(t *testing.T) {
			rec, err := decodeRecord(value)
			require.ErrorIs(t, err, ErrCorruptRecord)
			assert.Nil(t, rec)
		})
	}
}

func TestRedisDecodeReply(t *testing.T) {
	inFlight := "\x02\x01\x03tok"
	tests := []struct {
		name  string
		reply any
		want  *Record
	}{
		{"lease", []any{inFlight, int64(1500)}, &Record{State: StateInFlight, Token: "tok", LeaseRemaining: 1500 * time.Millisecond}},
		{"no expiry", []any{inFlight, int64(-1)}, &Record{State: StateInFlight, Token: "tok"}},
		{"lease past a Duration", []any{inFlight, int64(math.MaxInt64)}, &Record{State: StateInFlight, Token: "tok",
			LeaseRemaining: time.Duration(math.MaxInt64/int64(time.Millisecond)) * time.Millisecond}},
		{"completed", []any{"\x02\x02\x01t\xcc\x01\x00\x00\x00\x00\x00", int64(-1)},
			&Record{State: StateCompleted, Token: "t", Response: Response{StatusCode: http.StatusNoContent}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := redisDecodeReply(tt.reply)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			assert.GreaterOrEqual(t, got.LeaseRemaining, time.Duration(0))
		})
	}

	for name, reply := range map[string]any{
		"a string":      inFlight,
		"one element":   []any{inFlight},
		"lease missing": []any{inFlight, nil},
		"not a value":   []any{int64(1), int64(1)},
	} {
		_, err := redisDecodeReply(reply)
		assert.Error(t, err, name)
	}
	_, err := redisDecodeReply([]any{"\x07\x01\x00", int64(5)})
	assert.ErrorIs(t, err, ErrCorruptRecord)
}
