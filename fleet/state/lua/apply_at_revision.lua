-- Apply a transition's writes only if the record is still at the revision
-- they were computed from: optimistic concurrency in one round trip instead
-- of WATCH, HGETALL, MULTI/EXEC. The state and attempt are compared too, so
-- a writer that does not count revisions is not overwritten either.
-- KEYS: task; ARGV: revision, state, attempts (JSON), then each command as
-- its word count and its words.
-- 1: applied; 0: the record changed (read it again); -1: it is gone.
if redis.call('exists', KEYS[1]) == 0 then return -1 end
if (redis.call('hget', KEYS[1], 'revision') or '0') ~= ARGV[1]
   or redis.call('hget', KEYS[1], 'state') ~= ARGV[2]
   or redis.call('hget', KEYS[1], 'attempts') ~= ARGV[3] then return 0 end
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
