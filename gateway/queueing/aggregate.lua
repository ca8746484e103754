-- Service-level counters: move one contact to a better-ranked outcome, once (see
-- gateway/dashboard/aggregates.py). The contact hash remembers the outcome ('agg'), so an
-- event read twice (a redelivered stream entry) changes nothing.
-- KEYS: 1 contact hash, 2 minute bucket, 3 hour bucket, 4 open zset of the label,
--       5 waiting zset (calls), 6 breaches zset
-- ARGV: 1 contact id, 2 label, 3 outcome, 4 rank, 5 due (us), 6 bucket ttl (s),
--       7 time bin field suffix ('' = none), 8 time (ms), 9 event at (us), 10 received (us),
--       11 is a call (1/0), 12 ends the wait (1/0)
local label = ARGV[2]
if ARGV[12] == '1' then
  redis.call('ZREM', KEYS[5], ARGV[1])
end
local cur = redis.call('HGET', KEYS[1], 'agg')
local cur_outcome, cur_rank
if not cur then
  for b = 2, 3 do
    redis.call('HINCRBY', KEYS[b], label .. ':volume', 1)
    redis.call('EXPIRE', KEYS[b], ARGV[6])
  end
  cur_outcome, cur_rank = 'open', 0
  redis.call('HSET', KEYS[1], 'agg', 'open:0')
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
  if ARGV[11] == '1' and ARGV[12] ~= '1' then
    redis.call('ZADD', KEYS[5], ARGV[10], ARGV[1])
  end
else
  local sep = string.find(cur, ':', 1, true)
  cur_outcome, cur_rank = string.sub(cur, 1, sep - 1), tonumber(string.sub(cur, sep + 1))
end
local rank = tonumber(ARGV[4])
if rank <= cur_rank then
  return 0
end
local outcome = ARGV[3]
for b = 2, 3 do
  if cur_outcome ~= 'open' then
    redis.call('HINCRBY', KEYS[b], label .. ':' .. cur_outcome, -1)
  end
  redis.call('HINCRBY', KEYS[b], label .. ':' .. outcome, 1)
  if ARGV[7] ~= '' then
    redis.call('HINCRBY', KEYS[b], label .. ':t:' .. ARGV[7], 1)
    redis.call('HINCRBY', KEYS[b], label .. ':tsum', ARGV[8])
  end
end
redis.call('HSET', KEYS[1], 'agg', outcome .. ':' .. ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[1])
if outcome == 'breached' or outcome == 'late' then
  redis.call('ZADD', KEYS[6], 'NX', ARGV[9], ARGV[1])
end
return 1
