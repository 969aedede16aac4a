-- A failed try of an on_done delivery: due again at ARGV[2], its state
-- (tries counted) stored — unless another deliverer finished it meanwhile
-- (its try outlasted its lease), which must not bring it back.
-- KEYS: due set, deliveries hash; ARGV: delivery id, when, state. 1: kept.
if not redis.call('zscore', KEYS[1], ARGV[1]) then return 0 end
redis.call('zadd', KEYS[1], ARGV[2], ARGV[1])
redis.call('hset', KEYS[2], ARGV[1], ARGV[3])
return 1
