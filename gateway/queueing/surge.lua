-- A surge written once per mark (a citizen's repeat surge: once per citizen and day; a key's
-- surge found by the evaluator: once per key and period, gateway/cases/surge.py): the mark
-- is set (SET NX with its expiry) and, only if this call set it, the event is appended,
-- indexed in its contact's hash while the contact is retained (as emit.lua does) and listed
-- in the dashboard's surges zset (the last day of it kept). The event is written in the call
-- that sets its mark, so a call lost on its way (a connection, a cancelled caller) leaves no
-- mark without its event, and two instances (or a retry) write the event once. The reads
-- come first: a contact key of the wrong type fails the call before the mark is set.
-- KEYS: 1 events stream, 2 contact hash, 3 the mark, 4 surges zset, 5 (optional) the
--       previous period's mark
-- ARGV: 1 contact id, 2 event JSON, 3 the mark's expiry (s), 4 the event's score (its at,
--       us), 5 the zset's cut-off (us: what scores at or below it leaves), 6 the mark's
--       value (optional, default 1; the evaluator's is the surge's time, us), 7 with KEYS[5]:
--       how long after the previous period's surge (us) none is written
-- Returns the event's entry id, or false when the mark was there, or the previous period's
-- surge too recent (nothing written).
local KEYS, ARGV = KEYS, ARGV  -- upvalues: each use is no look-up in the globals
local retained = redis.call('HEXISTS', KEYS[2], 'received_us') == 1
if KEYS[5] then
  local last = tonumber(redis.call('GET', KEYS[5]))
  if last and tonumber(ARGV[4]) - last < tonumber(ARGV[7]) then
    return false
  end
end
if not redis.call('SET', KEYS[3], ARGV[6] or 1, 'NX', 'EX', ARGV[3]) then
  return false
end
local event = redis.call('XADD', KEYS[1], '*',
  'event', ARGV[2], 'contact_id', ARGV[1], 'type', 'surge')
if retained then
  redis.call('HSET', KEYS[2], 'event:' .. event, ARGV[2])
end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[5])
return event
