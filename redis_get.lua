-- get: KEYS[1] the record key. Returns nil when the key is absent,
-- otherwise the record as record_reply formats it.
local v = redis.call('GET', KEYS[1])
if not v then
  return false
end
local state = record_owner(v)
return record_reply(v, state)
