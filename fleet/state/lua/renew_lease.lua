-- Renew a lease only if it is still ours; take it back if it vanished (a
-- Redis restart that outlived its TTL) while the record still shows our
-- attempt running.
-- KEYS: lease, task; ARGV: owner|attempt, ms, attempt. 1: renewed.
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if held then return 0 end
if redis.call('hget', KEYS[2], 'state') == '"running"'
   and redis.call('hget', KEYS[2], 'attempts') == ARGV[3] then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
