-- Trim a stream only below what every consumer group on it has read and acknowledged: the
-- oldest entry still pending in any group, or the first one a group has not been handed yet.
-- A stream no group reads is capped at ARGV[1] entries (0: not at all). ARGV[2], when not '',
-- is an operator-chosen retention floor: entries older than that id go whatever was read.
-- KEYS: 1 stream
-- ARGV: 1 cap for a stream without groups, 2 retention floor id or ''
-- Returns {entries left, consumer groups, entries removed}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0}
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local floor = nil
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do
    info[group[i]] = group[i + 1]
  end
  local keep
  if tonumber(info['pending']) > 0 then
    keep = redis.call('XPENDING', KEYS[1], info['name'])[2]
  else
    local ms, seq = parse(info['last-delivered-id'])
    if seq < 1e14 then
      keep = string.format('%.0f-%.0f', ms, seq + 1)
    else
      keep = info['last-delivered-id']
    end
  end
  if floor == nil or before(keep, floor) then
    floor = keep
  end
end
if ARGV[2] ~= '' and (floor == nil or before(floor, ARGV[2])) then
  floor = ARGV[2]
end
local removed = 0
if #groups == 0 and tonumber(ARGV[1]) > 0 then
  removed = redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[1])
end
if floor ~= nil then
  removed = removed + redis.call('XTRIM', KEYS[1], 'MINID', floor)
end
return {redis.call('XLEN', KEYS[1]), #groups, removed}
