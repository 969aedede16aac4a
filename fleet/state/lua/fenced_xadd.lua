-- Append to a task's event stream only while the task is still on the
-- writer's attempt and that attempt was not declared lost (a `retrying`
-- task runs no attempt): the fencing token of output and events, as the
-- epoch is of state transitions.
-- KEYS: task, events; ARGV: attempt, maxlen, field, value, ...
-- Returns why it was refused, nothing when written.
local current = redis.call('hget', KEYS[1], 'attempts')
if not current then return 'gone' end
if current ~= ARGV[1] then return 'on attempt ' .. current end
if redis.call('hget', KEYS[1], 'state') == '"retrying"' then return 'retrying' end
redis.call('xadd', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return false
