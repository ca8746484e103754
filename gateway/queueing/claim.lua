-- The deadline watcher's claim: of several instances racing for a due member, only the one
-- whose ZREM removed it writes the event (see gateway/cases/watcher.py).
-- KEYS: 1 the sorted set to claim from, 2 events stream, 3 a sorted set to clear as well
--       (a warning's is its own set: then nothing more to clear), 4 the contact's hash (its
--       event index)
-- ARGV: 1 contact id, 2 now (us), 3 event JSON ('' to drop without an event), 4 type
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[3] ~= KEYS[1] then
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if ARGV[3] == '' then
  return 0
end
local event = redis.call('XADD', KEYS[2], '*',
  'event', ARGV[3], 'contact_id', ARGV[1], 'type', ARGV[4])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[4], 'event:' .. event, ARGV[3])
end
return 1
