-- Append an event; index it in the contact's hash; 'abandoned' and 'closed' settle the deadline;
-- and take the event's wallboard step when one is given (then aggstep.lua is put before this
-- text: store.py's 'emit_step'; without a step the plain text runs, the step's code not loaded).
-- The same event written twice (a timed-out write that had landed, then its spooled copy
-- replayed) is written once: the hash remembers a digest of each event it indexed.
-- KEYS: 1 events stream, 2 contact hash, 3 deadlines zset, 4 warnings zset, then optionally
--       the event's wallboard step: its 6 keys (the first the contact hash again)
-- ARGV: 1 contact id, 2 event type, 3 event JSON, 4 clears (1/0), 5 counted (1: the writer
--       knew the contact's facts, so its step is the one given here, or none; else, or
--       absent, the dashboard's reader steps the event), 6 once (the event's time: written
--       once per contact and type, as a stamp, into field 'stamp:<type>', and only while the
--       contact is retained; '' or absent: as any event), then the step's 13 arguments if
--       given
-- One read says whether the contact is retained (its edge stamp) and whether it has the event
-- (or, once, its type) already; the event is appended first, then its digest, index entry and
-- stamp are written by one HSET (the call is atomic), so a call that fails at its XADD leaves
-- no digest behind. The step comes last; one that fails is logged (agg_safely) and the event
-- stays written: the call returns {entry id, 0} instead of the entry id. An event marked
-- 'counted' is skipped by the dashboard's reader. Returns false when nothing was written.
local digest = 'emitted:' .. redis.sha1hex(ARGV[3])
local stamp = digest
local once = ARGV[6] ~= nil and ARGV[6] ~= ''
if once then
  stamp = 'stamp:' .. ARGV[2]
end
local seen = redis.call('HMGET', KEYS[2], 'received_us', digest, stamp)
local known = seen[1] ~= false
if (known and (seen[2] or seen[3])) or (once and not known) then
  return false
end
local event
if ARGV[5] == '1' then
  event = redis.call('XADD', KEYS[1], '*',
    'event', ARGV[3], 'contact_id', ARGV[1], 'type', ARGV[2], 'counted', '1')
else
  event = redis.call('XADD', KEYS[1], '*',
    'event', ARGV[3], 'contact_id', ARGV[1], 'type', ARGV[2])
end
if once then
  redis.call('HSET', KEYS[2], digest, 1, 'event:' .. event, ARGV[3], stamp, ARGV[6])
elseif known then
  redis.call('HSET', KEYS[2], digest, 1, 'event:' .. event, ARGV[3])
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
if known and #KEYS == 10 and not (agg_safely(agg_step, 4, 6) and agg_flush(true)) then
  return {event, 0}  -- written, its step failed (logged)
end
return event
