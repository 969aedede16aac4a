-- An agent's max_running slots: its running task ids, scored by when their
-- lease expires (ms, the server's clock; a renewal of the lease renews it).
-- Entries whose lease expired (a dead host's) are dropped first, so their
-- slots are free again. With a task id, take one for it (or keep the one it
-- holds); without (''), count the slots taken.
-- KEYS: the agent's running set; ARGV: task id or '', max_running, lease ms.
-- 1: taken; 2: the task holds one already (a duplicate message); 0: none
-- free. Counting: the number taken.
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if ARGV[1] == '' then return redis.call('zcard', KEYS[1]) end
local held = redis.call('zscore', KEYS[1], ARGV[1])
if not held and redis.call('zcard', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
if held then return 2 end
return 1
