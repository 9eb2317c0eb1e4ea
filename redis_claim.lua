-- claim: KEYS[1] the record key, ARGV[1] the token, ARGV[2] the lease in ms.
-- Returns 1 when the caller holds the key (it was absent, or already in
-- flight under ARGV[1]: a re-sent claim), otherwise the record that is
-- there, as record_reply formats it.
local v = redis.call('GET', KEYS[1])
if v then
  local state, token = record_owner(v)
  if state ~= 1 or token ~= ARGV[1] then
    return record_reply(v, state)
  end
end
redis.call('SET', KEYS[1], string.char(RECORD_VERSION, 1, #ARGV[1]) .. ARGV[1], 'PX', ARGV[2])
return 1
