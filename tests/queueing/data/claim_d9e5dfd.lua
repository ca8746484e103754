-- The deadline watcher's claims of one step of its sweep: of several instances racing for a
-- due member, only the one whose call removes it writes the event (see
-- gateway/cases/watcher.py). One call takes the step's members (up to 50): their scores in one
-- ZMSCORE, their contact hashes checked by one EXISTS, the claimed ones removed in one ZREM a
-- set at the end (the call is atomic, so no other claim comes between).
-- KEYS: 1 the sorted set to claim from, 2 events stream, 3 a sorted set to clear as well (a
--       warning's is its own set: then nothing more to clear), then each member's contact hash
--       (its event index)
-- ARGV: 1 now (us), 2 event type, then each member's contact id and event JSON ('' to drop
--       the member without an event)
-- Returns one flag a member: 1 when this call claimed it and wrote its event.
local KEYS, ARGV = KEYS, ARGV  -- upvalues: each use is no look-up in the globals
local n = #KEYS - 3
if n == 0 then
  return {}
end
local now, type = tonumber(ARGV[1]), ARGV[2]
local ids = {}
for c = 1, n do
  ids[c] = ARGV[2 * c + 1]
end
local scores = redis.call('ZMSCORE', KEYS[1], unpack(ids))
local claimed, flags, written, hashes = {}, {}, {}, {}
for c = 1, n do
  flags[c] = 0
  local score = scores[c]
  if score and tonumber(score) <= now then
    claimed[#claimed + 1] = ids[c]
    if ARGV[2 * c + 2] ~= '' then
      written[#written + 1] = c
      hashes[#hashes + 1] = KEYS[3 + c]
    end
  end
end
-- A claimed member's event is indexed in its contact's hash while the hash is retained (a
-- hash that expired since is not made again): one EXISTS for all of them, the common case,
-- and one each only when some expired.
local every = #hashes > 0 and redis.call('EXISTS', unpack(hashes)) == #hashes
for _, c in ipairs(written) do
  local id, body = ids[c], ARGV[2 * c + 2]
  local event = redis.call('XADD', KEYS[2], '*', 'event', body, 'contact_id', id, 'type', type)
  if every or redis.call('EXISTS', KEYS[3 + c]) == 1 then
    redis.call('HSET', KEYS[3 + c], 'event:' .. event, body)
  end
  flags[c] = 1
end
if #claimed > 0 then
  redis.call('ZREM', KEYS[1], unpack(claimed))
  if KEYS[3] ~= KEYS[1] then
    redis.call('ZREM', KEYS[3], unpack(claimed))
  end
end
return flags
