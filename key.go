package idempotency

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"strings"
)

// keyMaxLen is the longest client key accepted, counted after unquoting.
const keyMaxLen = 255

// keyError is the reason a key header was refused. detail is a sentence for
// the problem response's detail member; it names the header and the rule
// that failed, never the key itself.
type keyError struct{ detail string }

// Error returns the detail sentence.
func (e *keyError) Error() string { return e.detail }

// keyFail returns a *keyError for the header name and the rule, given as the
// end of a sentence whose subject is the header name.
func keyFail(name, rule string) error {
	return &keyError{detail: name + " " + rule}
}

// The rules a key header can break, as sentence endings after the header
// name. Each rule has its own text so the client can tell which one failed.
const (
	keyRuleRepeated    = "must be sent only once, not in several header lines"
	keyRuleEmpty       = "must not be empty"
	keyRuleTooLong     = "must be at most 255 characters"
	keyRuleNotASCII    = "must contain only printable ASCII characters"
	keyRuleComma       = "must be a single value: a comma separates two values (quote the key if it contains one)"
	keyRuleSpace       = "must not contain spaces unless it is a quoted string"
	keyRuleQuote       = "must not contain a double quote unless it is a quoted string"
	keyRuleEscape      = "quoted string may escape only a double quote or a backslash"
	keyRuleUnterminate = "quoted string is missing its closing double quote"
	keyRuleTrailing    = "must not have anything but parameters after its quoted string"
	keyRuleParams      = "has malformed parameters after its quoted string"
)

// parseKey returns the client key from the values of the key header
// (r.Header[name], with at least one element; the caller handles a missing
// header). name is the configured header name, used in error details. On
// failure it returns a *keyError.
//
// Two forms are accepted and mean the same key: the bare form (abc), which
// most clients send, and an RFC 9651 sf-string ("abc"), in which a backslash
// may escape only a double quote or a backslash. Parameters (;name=value)
// are recognised, and ignored, only after a quoted string: the bare abc;v=1
// is the key "abc;v=1". Leading and trailing spaces and tabs around the
// value are not part of it (RFC 9110 optional whitespace).
//
// A valid bare key is returned as a substring of the header value, without
// allocating.
func parseKey(name string, values []string) (string, error) {
	if len(values) > 1 {
		return "", keyFail(name, keyRuleRepeated)
	}
	v := strings.Trim(values[0], " \t")
	if v == "" {
		return "", keyFail(name, keyRuleEmpty)
	}
	if v[0] == '"' {
		return parseQuotedKey(name, v)
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; !keyBareByte[c] {
			return "", keyFail(name, keyBareRule(c))
		}
	}
	if len(v) > keyMaxLen {
		return "", keyFail(name, keyRuleTooLong)
	}
	return v, nil
}

// keyBareByte tells the bytes a bare key may hold: printable ASCII but the
// space, the comma and the double quote.
var keyBareByte = func() (ok [256]bool) {
	for c := 0x21; c <= 0x7e; c++ {
		ok[c] = c != ',' && c != '"'
	}
	return ok
}()

// keyBareRule returns the rule that the byte c, refused in a bare key,
// breaks.
func keyBareRule(c byte) string {
	switch c {
	case ',':
		return keyRuleComma
	case ' ':
		return keyRuleSpace
	case '"':
		return keyRuleQuote
	}
	return keyRuleNotASCII
}

// parseQuotedKey parses v, which starts with a double quote, as an RFC 9651
// sf-string optionally followed by parameters. Without escapes the key is a
// substring of v; with them it is built once.
func parseQuotedKey(name, v string) (string, error) {
	escapes := 0 // backslashes consumed by escapes so far
	end := -1    // index of the closing quote
scan:
	for i := 1; i < len(v); i++ {
		switch c := v[i]; {
		case c == '\\':
			i++
			if i == len(v) {
				return "", keyFail(name, keyRuleUnterminate)
			}
			if v[i] != '"' && v[i] != '\\' {
				if v[i] < 0x20 || v[i] > 0x7e {
					return "", keyFail(name, keyRuleNotASCII)
				}
				return "", keyFail(name, keyRuleEscape)
			}
			escapes++
		case c == '"':
			end = i
			break scan
		case c < 0x20 || c > 0x7e:
			return "", keyFail(name, keyRuleNotASCII)
		}
	}
	if end < 0 {
		return "", keyFail(name, keyRuleUnterminate)
	}
	if rest := v[end+1:]; rest != "" {
		if rest[0] != ';' {
			return "", keyFail(name, keyRuleTrailing)
		}
		if err := keySkipParams(name, rest); err != nil {
			return "", err
		}
	}
	raw := v[1:end]
	switch n := len(raw) - escapes; {
	case n == 0:
		return "", keyFail(name, keyRuleEmpty)
	case n > keyMaxLen:
		return "", keyFail(name, keyRuleTooLong)
	}
	if escapes == 0 {
		return raw, nil
	}
	var b strings.Builder
	b.Grow(len(raw) - escapes)
	for i := 0; i < len(raw); i++ {
		if raw[i] == '\\' {
			i++
		}
		b.WriteByte(raw[i])
	}
	return b.String(), nil
}

// keySkipParams checks the parameters after a quoted key, which are
// otherwise ignored. They must be printable ASCII, any quoted string in them
// must be closed, and a comma outside a quoted string is refused: it would
// start a second list member, that is, a second key.
func keySkipParams(name, params string) error {
	quoted := false
	for i := 0; i < len(params); i++ {
		c := params[i]
		switch {
		case c < 0x20 || c > 0x7e:
			return keyFail(name, keyRuleNotASCII)
		case quoted && c == '\\':
			i++ // an escaped byte neither closes the string nor separates
			if i == len(params) {
				return keyFail(name, keyRuleParams)
			}
			if params[i] < 0x20 || params[i] > 0x7e {
				return keyFail(name, keyRuleNotASCII)
			}
		case c == '"':
			quoted = !quoted
		case c == ',' && !quoted:
			return keyFail(name, keyRuleComma)
		}
	}
	if quoted {
		return keyFail(name, keyRuleParams)
	}
	return nil
}

// keyHashBufSize is the framed (scope, key) size hashed on the stack; longer
// input (a long scope) is hashed as a stream.
const keyHashBufSize = 512

// StorageKey returns the key under which a store keeps the record for the
// client key under scope (see Config.KeyScope; "" when keys are not scoped).
// It is what the middleware passes to a [Store], so an operator uses it with
// Store.Get and Store.Delete to inspect or clear a key.
//
// The result is the lowercase hex SHA-256 (64 characters) of the
// length-framed pair
//
//	uint64be(len(scope)) || scope || uint64be(len(key)) || key
//
// Framing both fields keeps ("ab", "c") and ("a", "bc") apart, every storage
// key has the same length, and no client input reaches a store in clear. A
// store may add its own prefix.
func StorageKey(scope, key string) string {
	var buf [2 * sha256.Size]byte
	return string(appendStorageKey(buf[:0], scope, key))
}

// appendStorageKey appends StorageKey(scope, key) to dst, so that a caller
// can build it together with other bytes in one allocation.
func appendStorageKey(dst []byte, scope, key string) []byte {
	var sum [sha256.Size]byte
	if n := 16 + len(scope) + len(key); n <= keyHashBufSize {
		var buf [keyHashBufSize]byte
		b := binary.BigEndian.AppendUint64(buf[:0], uint64(len(scope)))
		b = append(b, scope...)
		b = binary.BigEndian.AppendUint64(b, uint64(len(key)))
		b = append(b, key...)
		sum = sha256.Sum256(b)
	} else {
		h := sha256.New()
		var frame [8]byte
		binary.BigEndian.PutUint64(frame[:], uint64(len(scope)))
		h.Write(frame[:])
		h.Write([]byte(scope))
		binary.BigEndian.PutUint64(frame[:], uint64(len(key)))
		h.Write(frame[:])
		h.Write([]byte(key))
		h.Sum(sum[:0])
	}
	return hex.AppendEncode(dst, sum[:])
}
