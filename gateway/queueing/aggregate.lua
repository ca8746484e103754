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
local moves, morder = {}, {}  -- bucket key -> {fields = {field -> n}, order = {field...}}
local drops, dorder = {}, {}  -- zset key -> {member...} (ZREM)
local marks, korder = {}, {}  -- zset key -> {score, member...} (ZADD NX)
local function move(key, field, by)
  local t = moves[key]
  if not t then
    t = {fields = {}, order = {}}
    moves[key] = t
    morder[#morder + 1] = key
  end
  if not t.fields[field] then
    t.order[#t.order + 1] = field
    t.fields[field] = 0
  end
  t.fields[field] = t.fields[field] + by
end
local function push(into, order, key, ...)
  local t = into[key]
  if not t then
    t = {}
    into[key] = t
    order[#order + 1] = key
  end
  for _, v in ipairs({...}) do
    t[#t + 1] = v
  end
end
local flags = {}
for step = 0, #KEYS / 6 - 1 do
  local K = {KEYS[step * 6 + 1], KEYS[step * 6 + 2], KEYS[step * 6 + 3], KEYS[step * 6 + 4],
             KEYS[step * 6 + 5], KEYS[step * 6 + 6]}
  local A = {}
  for i = 1, 13 do A[i] = ARGV[step * 13 + i] end
  local flag = 0
  if A[13] == '1' then
    flag = redis.call('HSETNX', K[1], 'surged', 1)
  end
  flags[#flags + 1] = flag
  local label = A[2]
  if A[12] == '1' then
    push(drops, dorder, K[5], A[1])
  end
  local cur = redis.call('HGET', K[1], 'agg')
  local cur_outcome, cur_rank
  if not cur then
    for b = 2, 3 do
      redis.call('HINCRBY', K[b], label .. ':volume', 1)
      redis.call('EXPIRE', K[b], A[6])
    end
    cur_outcome, cur_rank = 'open', 0
    redis.call('HSET', K[1], 'agg', 'open:0')
    redis.call('ZADD', K[4], A[5], A[1])
    if A[11] == '1' and A[12] ~= '1' then
      redis.call('ZADD', K[5], A[10], A[1])
    end
  else
    local sep = string.find(cur, ':', 1, true)
    cur_outcome, cur_rank = string.sub(cur, 1, sep - 1), tonumber(string.sub(cur, sep + 1))
  end
  local rank = tonumber(A[4])
  if rank > cur_rank then
    local outcome = A[3]
    for b = 2, 3 do
      if cur_outcome ~= 'open' then
        move(K[b], label .. ':' .. cur_outcome, -1)
      end
      move(K[b], label .. ':' .. outcome, 1)
      if A[7] ~= '' then
        move(K[b], label .. ':t:' .. A[7], 1)
        move(K[b], label .. ':tsum', tonumber(A[8]))
      end
    end
    redis.call('HSET', K[1], 'agg', outcome .. ':' .. A[4])
    push(drops, dorder, K[4], A[1])
    if outcome == 'breached' or outcome == 'late' then
      push(marks, korder, K[6], A[9], A[1])
    end
  end
end
for _, key in ipairs(morder) do
  local t = moves[key]
  for _, field in ipairs(t.order) do
    redis.call('HINCRBY', key, field, string.format('%.0f', t.fields[field]))
  end
end
for _, key in ipairs(dorder) do
  local t = drops[key]
  for i = 1, #t, 1000 do  -- unpack's bound on the stack
    redis.call('ZREM', key, unpack(t, i, math.min(#t, i + 999)))
  end
end
for _, key in ipairs(korder) do
  local t = marks[key]
  for i = 1, #t, 1000 do
    redis.call('ZADD', key, 'NX', unpack(t, i, math.min(#t, i + 999)))
  end
end
return flags
