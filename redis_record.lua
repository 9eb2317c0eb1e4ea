-- Shared prelude of the Redis store's scripts; each script is this file
-- followed by its own body. A record value starts with a fixed header:
--
--   byte 1          format version (2; 1 is still read)
--   byte 2          state (1 in flight, 2 completed)
--   byte 3          length n of the owner token (0-255)
--   bytes 4..3+n    owner token
--
-- followed, for a completed record, by the response, which only the Go
-- side reads. Versions 1 and 2 have the same header.

-- RECORD_VERSION is the version of the values the scripts write.
local RECORD_VERSION = 2

-- record_owner returns the state and owner token of the record value v, or
-- nil when v is not a record of a version this script understands.
local function record_owner(v)
  local version, state, n = string.byte(v, 1, 3)
  if (version ~= 1 and version ~= 2) or n == nil or #v < 3 + n then
    return nil
  end
  if state ~= 1 and state ~= 2 then
    return nil
  end
  if state == 1 and #v ~= 3 + n then
    return nil -- an in-flight record is the header alone
  end
  return state, string.sub(v, 4, 3 + n)
end

-- record_reply returns the value v, of state as record_owner read it, as a
-- script reply: the value and, for an in-flight record, the remaining
-- lease of KEYS[1] in milliseconds (otherwise -1). An unreadable value is
-- returned as it is, for the Go side to report.
local function record_reply(v, state)
  local lease = -1
  if state == 1 then
    lease = redis.call('PTTL', KEYS[1])
  end
  return {v, lease}
end
