-- Append an event; index it in the contact's hash; 'abandoned' and 'closed' settle the deadline.
-- The same event written twice (a timed-out write that had landed, then its spooled copy
-- replayed) is written once: the hash remembers a digest of each event it indexed.
-- KEYS: 1 events stream, 2 contact hash, 3 deadlines zset, 4 warnings zset
-- ARGV: 1 contact id, 2 event type, 3 event JSON, 4 clears (1/0)
local known = redis.call('EXISTS', KEYS[2]) == 1
if known and redis.call('HSETNX', KEYS[2], 'emitted:' .. redis.sha1hex(ARGV[3]), 1) == 0 then
  return false
end
local event = redis.call('XADD', KEYS[1], '*',
  'event', ARGV[3], 'contact_id', ARGV[1], 'type', ARGV[2])
if known then
  redis.call('HSET', KEYS[2], 'event:' .. event, ARGV[3])
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return event
