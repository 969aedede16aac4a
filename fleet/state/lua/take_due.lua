-- Take the on_done deliveries due by now: each is held until ARGV[2] (its
-- score moves there, so no other deliverer takes it while it is tried).
-- KEYS: due set, deliveries hash; ARGV: now, held until, how many at most.
-- Returns id, state, id, state, ... (state '' for one with none stored).
local taken = {}
for _, member in ipairs(redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])) do
  redis.call('zadd', KEYS[1], ARGV[2], member)
  taken[#taken + 1] = member
  taken[#taken + 1] = redis.call('hget', KEYS[2], member) or ''
end
return taken
