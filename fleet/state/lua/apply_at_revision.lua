-- Apply a transition's writes only if the record is still at the revision
-- they were computed from: optimistic concurrency in one round trip instead
-- of WATCH, HGETALL, MULTI/EXEC. The state and attempt are compared too, so
-- a writer that does not count revisions is not overwritten either.
-- A command whose name starts with '?' writes a key that whoever may write
-- records may also write (an event stream, an index): it may fail (that key
-- forged to another type) without stopping the writes after it — a script's
-- writes are not rolled back, and a transition must not stop half-way.
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
  local name = ARGV[i + 1]
  if string.sub(name, 1, 1) == '?' then
    redis.pcall(string.sub(name, 2), unpack(ARGV, i + 2, i + n))
  else
    redis.call(unpack(ARGV, i + 1, i + n))
  end
  i = i + n + 1
end
return 1
