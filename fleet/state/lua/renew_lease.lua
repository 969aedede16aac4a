-- Renew a lease only if it is still ours; take it back if it vanished (a
-- Redis restart that outlived its TTL) while the record still shows our
-- attempt running. With ARGV[5] = '1' (its agent has max_running) the
-- task's slot is renewed with it, or taken back.
-- KEYS: lease, task, the agent's running set; ARGV: owner|attempt, ms, attempt, task id, capped.
-- 1: renewed.
local function renew_slot()
  if ARGV[5] ~= '1' then return end
  local t = redis.call('time')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('zadd', KEYS[3], now + tonumber(ARGV[2]), ARGV[4])
end
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then
  renew_slot()
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if held then return 0 end
if redis.call('hget', KEYS[2], 'state') == '"running"'
   and redis.call('hget', KEYS[2], 'attempts') == ARGV[3] then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  renew_slot()
  return 1
end
return 0
