-- Stamp a deadline event once per contact and type, clear the deadline it settles, append it,
-- and take its wallboard step (aggstep.lua, put before this text) when one is given.
-- KEYS: 1 contact hash, 2 deadlines zset, 3 warnings zset, 4 events stream, then optionally
--       the event's wallboard step: its 6 keys (the first the contact hash again)
-- ARGV: 1 contact id, 2 event type, 3 at (us), 4 event JSON, 5 clears (1/0), 6 counted (1:
--       the writer knew the contact's facts, so its step is the one given here, or none; 0:
--       the dashboard's reader steps the event), then the step's 13 arguments if given
-- One read says whether the contact is still retained (its edge stamp) and not yet stamped
-- so; the event is appended first, then the stamp and the event's index entry are written by
-- one HSET (the call is atomic: nothing comes between the read and the write), so a call that
-- fails at its event (the server refuses the XADD) leaves nothing: its retry is stamped. The
-- step comes last; one that fails is logged (agg_safely) and the event stays written: the call
-- returns 2 instead of 1. An event marked 'counted' is skipped by the dashboard's reader.
local stamp = 'stamp:' .. ARGV[2]
local seen = redis.call('HMGET', KEYS[1], 'received_us', stamp)
if not seen[1] or seen[2] then
  return 0
end
local event
if ARGV[6] == '1' then
  event = redis.call('XADD', KEYS[4], '*',
    'event', ARGV[4], 'contact_id', ARGV[1], 'type', ARGV[2], 'counted', '1')
else
  event = redis.call('XADD', KEYS[4], '*',
    'event', ARGV[4], 'contact_id', ARGV[1], 'type', ARGV[2])
end
if ARGV[5] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[1], stamp, ARGV[3], 'event:' .. event, ARGV[4])
if #KEYS == 10 and not (agg_safely(agg_step, 4, 6) and agg_flush(true)) then
  return 2  -- written, its step failed (logged)
end
return 1
