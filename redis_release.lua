-- release: KEYS[1] the record key, ARGV[1] the token. Returns 1 when the
-- in-flight record held by ARGV[1] was deleted, 0 when the key is absent,
-- completed or owned by another token, -1 when the value is unreadable.
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
redis.call('DEL', KEYS[1])
return 1
