-- Service-level counters: move contacts to a better-ranked outcome, once each (see
-- gateway/cases/dashboard/aggregates.py). The contact hash remembers the outcome ('agg'), so an
-- event read twice (a redelivered stream entry) changes nothing. One call takes a batch of
-- steps: 6 keys and 13 arguments each. Returns one flag per step: 1 when the step asked to
-- mark the contact counted for surges (ARGV 13) and it was not yet (field 'surged').
-- KEYS (per step): 1 contact hash, 2 minute bucket, 3 hour bucket, 4 open zset of the label,
--       5 waiting zset (calls), 6 breaches zset
-- ARGV (per step): 1 contact id, 2 label, 3 outcome, 4 rank, 5 due (us), 6 bucket ttl (s),
--       7 time bin field suffix ('' = none), 8 time (ms), 9 event at (us), 10 received (us),
--       11 is a call (1/0), 12 ends the wait (1/0), 13 mark counted for surges (1/0)
-- A call's counter moves (HINCRBY of the settled steps) and its set removals (the open and
-- waiting sets) and breach entries are summed per key and field and sent at the end, one
-- command per key and field instead of one per step: the call is atomic, so nothing reads the
-- counters between its steps, and every final value is the one the steps in turn would have
-- left (a field moved by +1 and -1 is left at 0, as before). A step's own reads and writes of
-- the contact hash ('agg', 'surged') stay in turn: a later step of the same contact reads them.
-- (Each command a script runs costs Valkey its call, its arguments and its AOF copy:
-- docs/performance.md.)
local KEYS, ARGV = KEYS, ARGV  -- upvalues: each use is no look-up in the globals
local moves, morder = {}, {}  -- bucket key -> {fields = {field -> n}, order = {field...}}
local sets, sorder = {}, {}  -- {command, key} -> {argument...}: the ZREMs and ZADD NXs
local function move(key, field, by)
  local t = moves[key]
  if not t then
    t = {fields = {}, order = {}}
    moves[key] = t
    morder[#morder + 1] = key
  end
  local n = t.fields[field]
  if not n then
    t.order[#t.order + 1] = field
    n = 0
  end
  t.fields[field] = n + by
end
local function later(command, key, a, b)
  local name = command .. ' ' .. key
  local t = sets[name]
  if not t then
    t = {}
    sets[name] = t
    sorder[#sorder + 1] = {command, key, t}
  end
  t[#t + 1] = a
  if b then
    t[#t + 1] = b
  end
end
-- (the step's keys and arguments are read in place: no table a step)
local flags = {}
for step = 0, #KEYS / 6 - 1 do
  local k, a = step * 6, step * 13
  local hash, id, label = KEYS[k + 1], ARGV[a + 1], ARGV[a + 2]
  local flag = 0
  if ARGV[a + 13] == '1' then
    flag = redis.call('HSETNX', hash, 'surged', 1)
  end
  flags[#flags + 1] = flag
  if ARGV[a + 12] == '1' then
    later('ZREM', KEYS[k + 5], id)
  end
  local cur = redis.call('HGET', hash, 'agg')
  local cur_outcome, cur_rank
  if not cur then
    for b = 2, 3 do
      redis.call('HINCRBY', KEYS[k + b], label .. ':volume', 1)
      redis.call('EXPIRE', KEYS[k + b], ARGV[a + 6])
    end
    cur_outcome, cur_rank = 'open', 0
    redis.call('HSET', hash, 'agg', 'open:0')
    redis.call('ZADD', KEYS[k + 4], ARGV[a + 5], id)
    if ARGV[a + 11] == '1' and ARGV[a + 12] ~= '1' then
      redis.call('ZADD', KEYS[k + 5], ARGV[a + 10], id)
    end
  else
    local sep = string.find(cur, ':', 1, true)
    cur_outcome, cur_rank = string.sub(cur, 1, sep - 1), tonumber(string.sub(cur, sep + 1))
  end
  if tonumber(ARGV[a + 4]) > cur_rank then
    local outcome, bin = ARGV[a + 3], ARGV[a + 7]
    local left = cur_outcome ~= 'open' and label .. ':' .. cur_outcome
    local reached = label .. ':' .. outcome
    local binned, sum, ms
    if bin ~= '' then
      binned, sum, ms = label .. ':t:' .. bin, label .. ':tsum', tonumber(ARGV[a + 8])
    end
    for b = 2, 3 do
      local key = KEYS[k + b]
      if left then
        move(key, left, -1)
      end
      move(key, reached, 1)
      if binned then
        move(key, binned, 1)
        move(key, sum, ms)
      end
    end
    redis.call('HSET', hash, 'agg', outcome .. ':' .. ARGV[a + 4])
    later('ZREM', KEYS[k + 4], id)
    if outcome == 'breached' or outcome == 'late' then
      later('ZADD', KEYS[k + 6], ARGV[a + 9], id)
    end
  end
end
for _, key in ipairs(morder) do
  local t = moves[key]
  for _, field in ipairs(t.order) do
    redis.call('HINCRBY', key, field, string.format('%.0f', t.fields[field]))
  end
end
for _, set in ipairs(sorder) do
  local command, key, t = set[1], set[2], set[3]
  for i = 1, #t, 1000 do  -- unpack's bound on the stack
    if command == 'ZADD' then
      redis.call('ZADD', key, 'NX', unpack(t, i, math.min(#t, i + 999)))
    else
      redis.call('ZREM', key, unpack(t, i, math.min(#t, i + 999)))
    end
  end
end
return flags
