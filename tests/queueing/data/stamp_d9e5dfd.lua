-- Stamp a deadline event once per contact and type, clear the deadline it settles, append it.
-- KEYS: 1 contact hash, 2 deadlines zset, 3 warnings zset, 4 events stream
-- ARGV: 1 contact id, 2 event type, 3 at (us), 4 event JSON, 5 clears (1/0)
-- One read says whether the contact is still retained (its edge stamp) and not yet stamped
-- so; the event is appended first, then the stamp and the event's index entry are written by
-- one HSET (the call is atomic: nothing comes between the read and the write), so a call that
-- fails at its event (the server refuses the XADD) leaves nothing: its retry is stamped.
local KEYS, ARGV = KEYS, ARGV  -- upvalues: each use is no look-up in the globals
local stamp = 'stamp:' .. ARGV[2]
local seen = redis.call('HMGET', KEYS[1], 'received_us', stamp)
if not seen[1] or seen[2] then
  return 0
end
local event = redis.call('XADD', KEYS[4], '*',
  'event', ARGV[4], 'contact_id', ARGV[1], 'type', ARGV[2])
if ARGV[5] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[1], stamp, ARGV[3], 'event:' .. event, ARGV[4])
return 1
