-- Take one of an agent's max_running slots for a task: its id in the agent's
-- set of running tasks, scored by when its lease expires (ms, the server's
-- clock; the lease's renewal renews it). Entries whose lease expired (a dead
-- host's) are dropped first, so their slots are free again.
-- KEYS: the agent's running set; ARGV: task id, max_running, lease ms.
-- 1: taken; 2: the task holds one already (a duplicate message); 0: none free.
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
local held = redis.call('zscore', KEYS[1], ARGV[1])
if not held and redis.call('zcard', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
if held then return 2 end
return 1
