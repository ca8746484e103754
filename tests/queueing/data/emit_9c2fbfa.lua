-- Append an event; index it in the contact's hash; 'abandoned' and 'closed' settle the deadline.
-- The same event written twice (a timed-out write that had landed, then its spooled copy
-- replayed) is written once: the hash remembers a digest of each event it indexed.
-- KEYS: 1 events stream, 2 contact hash, 3 deadlines zset, 4 warnings zset
-- ARGV: 1 contact id, 2 event type, 3 event JSON, 4 clears (1/0)
-- One read says whether the contact is retained (its edge stamp) and whether it has the event
-- already; the event is appended first, then its digest and index entry are written by one
-- HSET (the call is atomic), so a call that fails at its XADD leaves no digest behind.
local KEYS, ARGV = KEYS, ARGV  -- upvalues: each use is no look-up in the globals
local digest = 'emitted:' .. redis.sha1hex(ARGV[3])
local seen = redis.call('HMGET', KEYS[2], 'received_us', digest)
local known = seen[1] ~= false
if known and seen[2] then
  return false
end
local event = redis.call('XADD', KEYS[1], '*',
  'event', ARGV[3], 'contact_id', ARGV[1], 'type', ARGV[2])
if known then
  redis.call('HSET', KEYS[2], digest, 1, 'event:' .. event, ARGV[3])
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return event
