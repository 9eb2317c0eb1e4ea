-- Shared prelude of the Redis store's scripts; each script is this file
-- followed by its own body. A record value starts with a fixed header:
--
--   byte 1          format version (1)
--   byte 2          state (1 in flight, 2 completed)
--   byte 3          length n of the owner token (0-255)
--   bytes 4..3+n    owner token
--
-- followed, for a completed record, by the payload, which only the Go side
-- reads.

-- record_owner returns the state and owner token of the record value v, or
-- nil when v is not a record of a version this script understands.
local function record_owner(v)
  local version, state, n = string.byte(v, 1, 3)
  if version ~= 1 or n == nil or #v < 3 + n then
    return nil
  end
  if state ~= 1 and state ~= 2 then
    return nil
  end
  return state, string.sub(v, 4, 3 + n)
end

-- record_reply returns the value v as a script reply: a completed or
-- unreadable record as it is, an in-flight record followed by the
-- remaining lease of KEYS[1] in milliseconds, in decimal.
local function record_reply(v, state)
  if state == 1 then
    return v .. redis.call('PTTL', KEYS[1])
  end
  return v
end
