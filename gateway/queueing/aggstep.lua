-- The dashboard's outcome step (gateway/queueing/outcomes.py, docs/wallboard.md), shared: this
-- text is put before aggregate.lua, stamp.lua and claim.lua when they are loaded, and before
-- emit.lua for an event that takes a step (store.py's 'emit_step').
-- agg_step(k, a) takes one step whose 6 keys start after KEYS[k] and 13 arguments after
-- ARGV[a]; agg_flush(safe) then writes the counter moves and set changes of every step taken
-- since the last flush, at the call's end. agg_step returns the step's flag: 1 when it asked
-- to mark the contact counted for surges (ARGV 13) and it was not yet (field 'surged').
-- agg_safely(f, ...) runs f (a step, a key's writes) for an event's writer: an error (data
-- the step does not expect: a malformed 'agg' field, a key of another type) is logged in
-- Valkey's log and the writer's call goes on, so its event is written once whatever its step
-- meets (Valkey keeps what a script wrote before an error: a claim that failed after its
-- events would append them again at its retry); the writer's reply says so, and the gateway
-- logs it. What the failed step or key would have counted is not counted: a step writes the
-- contact's 'agg' at once and its moves at the flush, so a contact whose moves failed keeps
-- its outcome uncounted (and in the open set, for a day at most).
-- KEYS (a step): 1 contact hash, 2 minute bucket, 3 hour bucket, 4 open zset of the label,
--       5 waiting zset (calls), 6 breaches zset
-- ARGV (a step): 1 contact id, 2 label, 3 outcome, 4 rank, 5 due (us), 6 bucket ttl (s),
--       7 time bin field suffix ('' = none), 8 time (ms), 9 event at (us), 10 received (us),
--       11 is a call (1/0), 12 ends the wait (1/0), 13 mark counted for surges (1/0)
-- The contact hash remembers the outcome ('agg'), so a step taken twice (an event's writer
-- took it, then a reader of an older version, or a redelivered entry) changes nothing.
-- A call's counter moves (HINCRBY of the settled steps) and its set removals (the open and
-- waiting sets) and breach entries are summed per key and field and sent at the end, one
-- command per key and field instead of one per step: the call is atomic, so nothing reads the
-- counters between its steps, and every final value is the one the steps in turn would have
-- left (a field moved by +1 and -1 is left at 0, as before). A step's own reads and writes of
-- the contact hash ('agg', 'surged') stay in turn: a later step of the same contact reads them.
-- (Each command a script runs costs Valkey its call, its arguments and its AOF copy:
-- docs/performance.md.)
local KEYS, ARGV = KEYS, ARGV  -- upvalues: each use is no look-up in the globals
local agg_moves, agg_morder = {}, {}  -- bucket key -> {fields = {field -> n}, order = {field...}}
local agg_sets, agg_sorder = {}, {}  -- {command, key} -> {argument...}: the ZREMs and ZADD NXs
local function agg_move(key, field, by)
  local t = agg_moves[key]
  if not t then
    t = {fields = {}, order = {}}
    agg_moves[key] = t
    agg_morder[#agg_morder + 1] = key
  end
  local n = t.fields[field]
  if not n then
    t.order[#t.order + 1] = field
    n = 0
  end
  t.fields[field] = n + by
end
local function agg_later(command, key, a, b)
  local name = command .. ' ' .. key
  local t = agg_sets[name]
  if not t then
    t = {}
    agg_sets[name] = t
    agg_sorder[#agg_sorder + 1] = {command, key, t}
  end
  t[#t + 1] = a
  if b then
    t[#t + 1] = b
  end
end
-- (the step's keys and arguments are read in place: no table a step)
local function agg_step(k, a)
  local hash, id, label = KEYS[k + 1], ARGV[a + 1], ARGV[a + 2]
  local flag = 0
  if ARGV[a + 13] == '1' then
    flag = redis.call('HSETNX', hash, 'surged', 1)
  end
  if ARGV[a + 12] == '1' then
    agg_later('ZREM', KEYS[k + 5], id)
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
        agg_move(key, left, -1)
      end
      agg_move(key, reached, 1)
      if binned then
        agg_move(key, binned, 1)
        agg_move(key, sum, ms)
      end
    end
    redis.call('HSET', hash, 'agg', outcome .. ':' .. ARGV[a + 4])
    agg_later('ZREM', KEYS[k + 4], id)
    if outcome == 'breached' or outcome == 'late' then
      agg_later('ZADD', KEYS[k + 6], ARGV[a + 9], id)
    end
  end
  return flag
end
local function agg_safely(f, ...)
  local ok, err = pcall(f, ...)
  if not ok then
    if type(err) == 'table' then
      err = err.err
    end
    redis.log(redis.LOG_WARNING, 'gateway: a wallboard step failed: ' .. tostring(err))
  end
  return ok
end
local function agg_write_moves(key, t)
  for _, field in ipairs(t.order) do
    redis.call('HINCRBY', key, field, string.format('%.0f', t.fields[field]))
  end
end
local function agg_write_set(command, key, t)
  for i = 1, #t, 1000 do  -- unpack's bound on the stack
    if command == 'ZADD' then
      redis.call('ZADD', key, 'NX', unpack(t, i, math.min(#t, i + 999)))
    else
      redis.call('ZREM', key, unpack(t, i, math.min(#t, i + 999)))
    end
  end
end
-- agg_flush(safe): with safe, each key's writes under agg_safely (one key of another type
-- costs the others nothing); returns false when one failed. The tables are emptied first, so
-- a move is written once even if the call flushed again.
local function agg_flush(safe)
  local moves, morder, sorder = agg_moves, agg_morder, agg_sorder
  agg_moves, agg_morder, agg_sets, agg_sorder = {}, {}, {}, {}
  local ok = true
  for _, key in ipairs(morder) do
    if safe then
      ok = agg_safely(agg_write_moves, key, moves[key]) and ok
    else
      agg_write_moves(key, moves[key])
    end
  end
  for _, set in ipairs(sorder) do
    if safe then
      ok = agg_safely(agg_write_set, set[1], set[2], set[3]) and ok
    else
      agg_write_set(set[1], set[2], set[3])
    end
  end
  return ok
end
