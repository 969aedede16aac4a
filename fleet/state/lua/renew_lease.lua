-- Renew a lease only if it is still ours; take it back if it vanished (a
-- Redis restart that outlived its TTL) while the record still shows our
-- attempt running. With ARGV[5] > 0 (the agent's max_running) the task's
-- slot is renewed with it; taking the lease back takes a slot back only if
-- one is free (else the run ends: another task took its place meanwhile).
-- A slot outlives its lease by a second, so it never runs out first.
-- KEYS: lease, task, the agent's running set; ARGV: owner|attempt, ms, attempt, task id, max_running.
-- 1: renewed.
local cap = tonumber(ARGV[5])
local function slot_kept(taking_back)
  if cap <= 0 then return true end
  local t = redis.call('time')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('zremrangebyscore', KEYS[3], '-inf', now)
  if not redis.call('zscore', KEYS[3], ARGV[4]) and taking_back
     and redis.call('zcard', KEYS[3]) >= cap then return false end
  redis.call('zadd', KEYS[3], now + tonumber(ARGV[2]) + 1000, ARGV[4])
  return true
end
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then
  slot_kept(false)
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if held then return 0 end
if redis.call('hget', KEYS[2], 'state') == '"running"'
   and redis.call('hget', KEYS[2], 'attempts') == ARGV[3] then
  if not slot_kept(true) then return 0 end
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
