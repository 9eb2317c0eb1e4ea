package idempotency

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const keyTestHeader = "Idempotency-Key"

func TestParseKeyValid(t *testing.T) {
	long := strings.Repeat("k", 255)
	tests := []struct {
		name  string
		value string
		want  string
	}{
		{"bare", "abc", "abc"},
		{"bare uuid", "8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"},
		{"quoted", `"abc"`, "abc"},
		{"quoted escaped quote", `"a\"b"`, `a"b`},
		{"quoted escaped backslash", `"a\\b"`, `a\b`},
		{"quoted only escapes", `"\"\\"`, `"\`},
		{"quoted space", `"a b"`, "a b"},
		{"quoted comma", `"a,b"`, "a,b"},
		{"quoted semicolon", `"a;b"`, "a;b"},
		{"quoted with parameter", `"abc";v=1`, "abc"},
		{"quoted with parameters", `"abc";a=1;b=?0;c`, "abc"},
		{"quoted with quoted parameter", `"abc";a="x,\"y"`, "abc"},
		{"quoted with spaced parameters", `"abc"; a=1; b=2`, "abc"},
		{"bare semicolon is part of key", "abc;v=1", "abc;v=1"},
		{"bare backslash", `a\b`, `a\b`},
		{"bare byte-sequence look-alike", ":YWJj:", ":YWJj:"},
		{"bare boolean look-alike", "?1", "?1"},
		{"bare symbols", "!#$%&'()*+-./:<=>?@[]^_`{|}~", "!#$%&'()*+-./:<=>?@[]^_`{|}~"},
		{"surrounding whitespace", " \tabc \t", "abc"},
		{"surrounding whitespace quoted", ` "a b" `, "a b"},
		{"bare 255", long, long},
		{"quoted 255", `"` + long + `"`, long},
		{"quoted 255 after unescaping", `"` + strings.Repeat(`\"`, 255) + `"`, strings.Repeat(`"`, 255)},
		{"single character", "x", "x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseKey(keyTestHeader, []string{tt.value})
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestParseKeyQuotedAndBareAreTheSameKey(t *testing.T) {
	bare, err := parseKey(keyTestHeader, []string{"order-42"})
	require.NoError(t, err)
	quoted, err := parseKey(keyTestHeader, []string{`"order-42"`})
	require.NoError(t, err)
	withParams, err := parseKey(keyTestHeader, []string{`"order-42";v=1`})
	require.NoError(t, err)
	assert.Equal(t, bare, quoted)
	assert.Equal(t, bare, withParams)
	assert.Equal(t, StorageKey("", bare), StorageKey("", quoted))
}

func TestParseKeyInvalid(t *testing.T) {
	const name = "X-Request-Key"
	tests := []struct {
		name   string
		values []string
		rule   string
	}{
		{"two header lines", []string{"a", "b"}, keyRuleRepeated},
		{"two identical header lines", []string{"a", "a"}, keyRuleRepeated},
		{"empty", []string{""}, keyRuleEmpty},
		{"only whitespace", []string{" \t "}, keyRuleEmpty},
		{"empty quoted", []string{`""`}, keyRuleEmpty},
		{"empty quoted with parameters", []string{`"";a=1`}, keyRuleEmpty},
		{"bare comma", []string{"a,b"}, keyRuleComma},
		{"bare two values", []string{"a, b"}, keyRuleComma},
		{"bare space", []string{"a b"}, keyRuleSpace},
		{"bare double quote", []string{`a"b`}, keyRuleQuote},
		{"bare trailing double quote", []string{`ab"`}, keyRuleQuote},
		{"bare 256", []string{strings.Repeat("k", 256)}, keyRuleTooLong},
		{"quoted 256", []string{`"` + strings.Repeat("k", 256) + `"`}, keyRuleTooLong},
		{"quoted 256 after unescaping", []string{`"` + strings.Repeat(`\\`, 256) + `"`}, keyRuleTooLong},
		{"huge bare", []string{strings.Repeat("k", 1<<20)}, keyRuleTooLong},
		{"bare tab", []string{"a\tb"}, keyRuleNotASCII},
		{"bare control", []string{"a\x00b"}, keyRuleNotASCII},
		{"bare DEL", []string{"a\x7fb"}, keyRuleNotASCII},
		{"bare UTF-8", []string{"caf\u00e9"}, keyRuleNotASCII},
		{"bare obs-text", []string{"a\xffb"}, keyRuleNotASCII},
		{"quoted UTF-8", []string{"\"caf\u00e9\""}, keyRuleNotASCII},
		{"quoted tab", []string{"\"a\tb\""}, keyRuleNotASCII},
		{"quoted escaped control", []string{"\"a\\\x01\""}, keyRuleNotASCII},
		{"parameter UTF-8", []string{"\"abc\";a=\u00e9"}, keyRuleNotASCII},
		{"unterminated", []string{`"abc`}, keyRuleUnterminate},
		{"lone quote", []string{`"`}, keyRuleUnterminate},
		{"unterminated after escape", []string{`"abc\"`}, keyRuleUnterminate},
		{"trailing backslash", []string{`"abc\`}, keyRuleUnterminate},
		{"bad escape", []string{`"a\nb"`}, keyRuleEscape},
		{"escaped space", []string{`"a\ b"`}, keyRuleEscape},
		{"text after quote", []string{`"abc"def`}, keyRuleTrailing},
		{"space after quote", []string{`"abc" ;a=1`}, keyRuleTrailing},
		{"list of strings", []string{`"a", "b"`}, keyRuleTrailing},
		{"second quoted string", []string{`"a""b"`}, keyRuleTrailing},
		{"list after parameters", []string{`"a";x=1, "b"`}, keyRuleComma},
		{"unterminated quoted parameter", []string{`"a";x="1`}, keyRuleParams},
		{"parameter ends in escape", []string{`"a";x="1\`}, keyRuleParams},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseKey(name, tt.values)
			assert.Empty(t, got)
			var kerr *keyError
			require.True(t, errors.As(err, &kerr), "want a *keyError, got %v", err)
			assert.Equal(t, name+" "+tt.rule, kerr.detail)
			assert.Equal(t, kerr.detail, err.Error())
		})
	}
}

func TestParseKeyRulesHaveDistinctDetails(t *testing.T) {
	rules := []string{
		keyRuleRepeated, keyRuleEmpty, keyRuleTooLong, keyRuleNotASCII, keyRuleComma,
		keyRuleSpace, keyRuleQuote, keyRuleEscape, keyRuleUnterminate, keyRuleTrailing, keyRuleParams,
	}
	seen := make(map[string]bool)
	for _, r := range rules {
		assert.False(t, seen[r], "duplicate detail %q", r)
		seen[r] = true
	}
	assert.Equal(t, "Idempotency-Key must be at most 255 characters", keyFail(keyTestHeader, keyRuleTooLong).Error())
}

func TestParseKeyDetailNeverEchoesKey(t *testing.T) {
	secret := "sk_live_" + strings.Repeat("s", 300)
	for _, v := range []string{secret, `"` + secret + `"`, secret + " x", `"` + secret} {
		_, err := parseKey(keyTestHeader, []string{v})
		require.Error(t, err)
		assert.NotContains(t, err.Error(), "sk_live_")
	}
}

func TestParseKeyAllocations(t *testing.T) {
	tests := []struct {
		name  string
		value string
		max   float64
	}{
		{"bare", "8e03978e-40d5-43e8-bc93-6894a57f9324", 0},
		{"quoted without escapes", `"8e03978e-40d5-43e8-bc93-6894a57f9324";v=1`, 0},
		{"quoted with escapes", `"a\"b"`, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			values := []string{tt.value}
			allocs := testing.AllocsPerRun(100, func() {
				if _, err := parseKey(keyTestHeader, values); err != nil {
					t.Fatal(err)
				}
			})
			assert.LessOrEqual(t, allocs, tt.max)
		})
	}
}

// keyTestStorageKey computes the documented storage key framing
// independently of StorageKey.
func keyTestStorageKey(scope, key string) string {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, uint64(len(scope)))
	b = append(b, scope...)
	b = binary.BigEndian.AppendUint64(b, uint64(len(key)))
	b = append(b, key...)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func TestStorageKey(t *testing.T) {
	longScope := strings.Repeat("tenant-", 200) // takes the streaming path
	tests := []struct{ scope, key string }{
		{"", "abc"},
		{"user-1", "abc"},
		{"", ""},
		{longScope, "abc"},
		{"user-1", strings.Repeat("k", 255)},
		{strings.Repeat("s", keyHashBufSize-16-255), strings.Repeat("k", 255)}, // exactly the stack buffer
	}
	for _, tt := range tests {
		got := StorageKey(tt.scope, tt.key)
		assert.Equal(t, keyTestStorageKey(tt.scope, tt.key), got)
		assert.Len(t, got, 64)
		assert.Equal(t, strings.ToLower(got), got)
		assert.Equal(t, got, StorageKey(tt.scope, tt.key), "deterministic")
	}
}

func TestStorageKeySeparatesScopes(t *testing.T) {
	pairs := [][2][2]string{
		{{"ab", "c"}, {"a", "bc"}},
		{{"", "abc"}, {"abc", ""}},
		{{"user-1", "k"}, {"user-2", "k"}},
		{{"", "k"}, {"user", "k"}},
		{{"a\x00\x00\x00\x00\x00\x00\x00\x01b", "c"}, {"a", "b\x00\x00\x00\x00\x00\x00\x00\x01c"}},
	}
	for _, p := range pairs {
		assert.NotEqual(t, StorageKey(p[0][0], p[0][1]), StorageKey(p[1][0], p[1][1]), "%q", p)
	}
}

func TestStorageKeyAllocations(t *testing.T) {
	allocs := testing.AllocsPerRun(100, func() {
		_ = StorageKey("tenant-42", "8e03978e-40d5-43e8-bc93-6894a57f9324")
	})
	assert.LessOrEqual(t, allocs, 1.0, "only the result string")
}

// keyTestQuote encodes s as an RFC 9651 sf-string.
func keyTestQuote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

func FuzzParseKey(f *testing.F) {
	for _, seed := range []string{
		"abc", `"abc"`, `"a\"b\\c"`, `"abc";v=1`, "abc;v=1", "a,b", "a b", `a"b`,
		`"abc`, `"a\nb"`, `"abc"x`, `"a";x="1,2"`, "", `""`, " \tabc ", "caf\u00e9",
		strings.Repeat("k", 255), strings.Repeat("k", 256), "\x00", `"\`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, value string) {
		key, err := parseKey(keyTestHeader, []string{value})
		if err != nil {
			var kerr *keyError
			if !errors.As(err, &kerr) || !strings.HasPrefix(kerr.detail, keyTestHeader+" ") {
				t.Fatalf("parseKey(%q): error %v is not a *keyError naming the header", value, err)
			}
			if key != "" {
				t.Fatalf("parseKey(%q) returned key %q with an error", value, key)
			}
			return
		}
		if len(key) < 1 || len(key) > keyMaxLen {
			t.Fatalf("parseKey(%q) accepted a key of length %d", value, len(key))
		}
		for i := 0; i < len(key); i++ {
			if key[i] < 0x20 || key[i] > 0x7e {
				t.Fatalf("parseKey(%q) accepted byte %#x", value, key[i])
			}
		}
		// Quoting round-trips, with or without parameters.
		for _, q := range []string{keyTestQuote(key), keyTestQuote(key) + ";v=1"} {
			again, err := parseKey(keyTestHeader, []string{q})
			if err != nil || again != key {
				t.Fatalf("parseKey(%q) = %q, %v; want %q (from %q)", q, again, err, key, value)
			}
		}
		// A key that the bare form can carry is the same key bare.
		trimmed := strings.Trim(value, " \t")
		if !strings.ContainsAny(key, " ,\"") {
			again, err := parseKey(keyTestHeader, []string{key})
			if err != nil || again != key {
				t.Fatalf("bare parseKey(%q) = %q, %v; want %q", key, again, err, key)
			}
		}
		if trimmed[0] != '"' && key != trimmed {
			t.Fatalf("bare parseKey(%q) = %q; want the trimmed value", value, key)
		}
		// Two header lines are always refused.
		if _, err := parseKey(keyTestHeader, []string{value, value}); err == nil {
			t.Fatalf("parseKey accepted two header lines of %q", value)
		}
	})
}
