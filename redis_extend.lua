-- extend: KEYS[1] the record key, ARGV[1] the token, ARGV[2] the lease in ms.
-- Returns 1 when the lease was renewed, 0 when the key is not in flight
-- under ARGV[1], -1 when the value is unreadable.
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
local state, token = record_owner(v)
if state == nil then
  return -1
end
if state ~= 1 or token ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
