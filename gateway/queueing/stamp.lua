-- Stamp a deadline event once per contact and type, clear the deadline it settles, append it.
-- KEYS: 1 contact hash, 2 deadlines zset, 3 warnings zset, 4 events stream
-- ARGV: 1 contact id, 2 event type, 3 at (us), 4 event JSON, 5 clears (1/0)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('HSETNX', KEYS[1], 'stamp:' .. ARGV[2], ARGV[3]) == 0 then
  return 0
end
if ARGV[5] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local event = redis.call('XADD', KEYS[4], '*',
  'event', ARGV[4], 'contact_id', ARGV[1], 'type', ARGV[2])
redis.call('HSET', KEYS[1], 'event:' .. event, ARGV[4])
return 1
