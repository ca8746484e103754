-- Trim a stream to its cap, but never past what a consumer group has not read: the oldest
-- entry still pending in any group, or the first one a group has not been handed yet. Read
-- entries are kept up to the cap (history for XRANGE readers: `gateway report`, `tail`).
-- KEYS: 1 stream
-- ARGV: 1 cap (0: none), 2 retention floor id or '' (an operator's retention: entries older
--       than it go whether read or not), 3 most entries to look at for the cap in one call
-- Returns {entries left, consumer groups, entries removed, backlog, more, slowest group}: the
-- backlog is what the slowest group has still to read or acknowledge; more = 1 when the cap
-- needs another call.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0, 0, 0, ''}
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
local function after(id)  -- the smallest id greater than id
  local ms, seq = parse(id)
  if seq < 1e14 then
    return string.format('%.0f-%.0f', ms, seq + 1)
  end
  return id
end
local length = redis.call('XLEN', KEYS[1])
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local floor = nil
local backlog = 0
local slowest = ''
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do
    info[group[i]] = group[i + 1]
  end
  local pending = tonumber(info['pending'])
  local keep
  if pending > 0 then
    keep = redis.call('XPENDING', KEYS[1], info['name'])[2]
  else
    keep = after(info['last-delivered-id'])
  end
  if floor == nil or before(keep, floor) then
    floor = keep
  end
  local lag = tonumber(info['lag'] or length) or length  -- nil lag (unknown): everything
  if lag + pending > backlog then
    backlog = lag + pending
    slowest = info['name']
  end
end
local target = nil
local more = 0
local cap = tonumber(ARGV[1])
if cap > 0 and length > cap then
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
  if floor == nil or before(first, floor) then  -- else every group still needs the head
    local excess = length - cap
    local look = math.min(excess, tonumber(ARGV[3]))
    local range = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', look)
    target = after(range[#range][1])
    if floor ~= nil and before(floor, target) then
      target = floor
    elseif look < excess then
      more = 1
    end
  end
end
if ARGV[2] ~= '' and (target == nil or before(target, ARGV[2])) then
  target = ARGV[2]
end
local removed = 0
if target ~= nil then
  removed = redis.call('XTRIM', KEYS[1], 'MINID', target)
end
return {redis.call('XLEN', KEYS[1]), #groups, removed, backlog, more, slowest}
