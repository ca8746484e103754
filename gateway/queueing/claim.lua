-- The deadline watcher's claims of one step of its sweep: of several instances racing for a
-- due member, only the one whose call removes it writes the event (see
-- gateway/cases/watcher.py). One call takes the step's members (up to 50): their scores in one
-- ZMSCORE, their contact hashes checked by one EXISTS, the claimed ones removed in one ZREM a
-- set (the call is atomic, so no other claim comes between). A claimed member's event with a
-- wallboard step (a breach) takes it here too (aggstep.lua, put before this text), while the
-- contact's hash is retained, and says so (field 'counted': the dashboard's reader skips it).
-- The steps come after the events and the removals: a step that fails is logged
-- (agg_safely), and the claim stands (its retry would append the events again).
-- KEYS: 1 the sorted set to claim from, 2 events stream, 3 a sorted set to clear as well (a
--       warning's is its own set: then nothing more to clear), then each member's contact hash
--       (its event index), then the dashboard steps' keys (6 each, aggstep.lua)
-- ARGV: 1 now (us), 2 event type, 3 members (n), then each member's contact id and event JSON
--       ('' to drop the member without an event), then each member's step number (1 for the
--       first step given, 0 for none), then the steps' arguments (13 each)
-- Returns one flag a member: 1 when this call claimed it and wrote its event, 2 when it did
-- and the member's step (or the flush of the call's steps) failed, 0 when it did not claim it.
local now, type, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
if n == 0 then
  return {}
end
local ids = {}
for c = 1, n do
  ids[c] = ARGV[2 * c + 2]
end
local scores = redis.call('ZMSCORE', KEYS[1], unpack(ids))
local claimed, flags, written, hashes = {}, {}, {}, {}
for c = 1, n do
  flags[c] = 0
  local score = scores[c]
  if score and tonumber(score) <= now then
    claimed[#claimed + 1] = ids[c]
    if ARGV[2 * c + 3] ~= '' then
      written[#written + 1] = c
      hashes[#hashes + 1] = KEYS[3 + c]
    end
  end
end
-- A claimed member's event is indexed in its contact's hash while the hash is retained (a
-- hash that expired since is not made again, nor its step taken): one EXISTS for all of
-- them, the common case, and one each only when some expired.
local every = #hashes > 0 and redis.call('EXISTS', unpack(hashes)) == #hashes
local steps_at = 3 + 2 * n  -- ARGV: each member's step number follows
local stepped = {}  -- the steps to take: {member, step number}
for _, c in ipairs(written) do
  local id, body = ids[c], ARGV[2 * c + 3]
  local retained = every or redis.call('EXISTS', KEYS[3 + c]) == 1
  local step = tonumber(ARGV[steps_at + c])
  local event
  if retained and step > 0 then
    event = redis.call('XADD', KEYS[2], '*',
      'event', body, 'contact_id', id, 'type', type, 'counted', '1')
    stepped[#stepped + 1] = {c, step}
  else
    event = redis.call('XADD', KEYS[2], '*', 'event', body, 'contact_id', id, 'type', type)
  end
  if retained then
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
for _, taken in ipairs(stepped) do
  local c, step = taken[1], taken[2]
  if not agg_safely(agg_step, 3 + n + (step - 1) * 6, steps_at + n + (step - 1) * 13) then
    flags[c] = 2
  end
end
if #stepped > 0 and not agg_flush(true) then
  for _, taken in ipairs(stepped) do
    flags[taken[1]] = 2
  end
end
return flags
