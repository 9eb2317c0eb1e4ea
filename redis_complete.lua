-- complete: KEYS[1] the record key, ARGV[1] the token, ARGV[2] the encoded
-- completed record, ARGV[3] its TTL in ms. Returns 1 when the record is
-- stored or was already completed under ARGV[1] (left as it is), 0 when the
-- key is absent or owned by another token, -1 when the value is unreadable.
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
local state, token = record_owner(v)
if state == nil then
  return -1
end
if token ~= ARGV[1] then
  return 0
end
if state == 1 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  -- A repeated completion. Setting the expiry it already has is still a
  -- write, so a WAIT behind this script covers the completion it repeats.
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
return 1
