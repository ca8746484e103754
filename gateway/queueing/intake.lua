-- Intake: a batch of contacts, each one atomic write of a new contact, or the id of the first
-- one (dedupe). One call takes the contacts of one coalesced batch in turn (the whole call is
-- atomic, so each contact is too), and its index entries of one key (deadlines, warnings, a
-- label's open set, the waiting calls, the repeats) go in one ZADD, its dashboard volumes of
-- one bucket and label in one HINCRBY, at the end: each command and argument a script runs is
-- copied into a command, into the AOF and into the propagation, so per contact it costs
-- Valkey about an eighth less than a call per contact with a command per index (docs/performance.md).
-- Every event of a contact is also kept in its hash as field 'event:<entry id>' (the per-contact
-- index the API reads), so it expires with the contact.
-- The dashboard's first step ("open", gateway/cases/dashboard/aggregates.py) is taken here, in
-- the same atomic write: the volume of the minute and hour buckets, the hash's 'agg' field, the
-- label's open zset, the waiting calls, the repeat contacts. The 'enqueued' event says so
-- (field 'counted', the repeat count), so the aggregator skips it without reading the contact;
-- its field 'keys' carries the contact's surge keys (JSON [received us, key, ...]), which the
-- aggregator counts with its cursor's move past the event (advance.lua: once); a repeat's (count
-- 2 or more) also carries field 'sender', the sender's pseudonym. (Before, the
-- field was 'surge', with a 'surge' mark in the hash that the aggregator took off with an
-- HDEL, once a contact: an older instance's events still come so, docs/operations.md.)
-- KEYS: 1 contacts stream, 2 events stream, 3 deadlines zset, 4 warnings zset, 5 waiting zset
--       (calls), 6 repeats zset (the keys every contact shares), then every contact's own keys
--       in turn: 1 dedupe key, 2 sender zset, 3 contact hash, 4 minute bucket, 5 hour bucket,
--       6 open zset of the label, 7 the sender's first contact in the window (a string:
--       its received_at), then its rate counters (8..)
-- ARGV: 1 the number of contacts n, 2 dedupe ttl (s), 3 repeat window (us), 4 retention (s),
--       5 bucket ttl (s), then (number of keys, number of arguments) of each contact
--       (6 .. 5+2n), then every contact's own arguments in turn:
--       1 id, 2 contact JSON before the repeat count, 3 contact JSON after it,
--       4 received_at (us), 5 due_at (us), 6 warn_at (us), 7 enqueued event JSON, 8 channel,
--       9 deadline kind, 10 count repeats (1/0), 11 label (the dashboard's row),
--       12 surge keys ('' = none), then for each of its rate counters (a fixed window of one
--       sender or adapter): its limit, the window length (ms), the ms left in the window and
--       whether it is the sender's (1/0)
-- Returns one reply per contact: {1, id, repeat count} written; {0, first id, 0} a duplicate;
-- {2, ms until that window ends, 0} rate limited: nothing written, nothing counted (the
-- dedupe key and the counters taken are given back); or an error reply (that contact alone;
-- one that failed before its stream entry gives its dedupe key and counters back too).
-- A duplicate passes before the rate limits: a peer's retry is never "too many".
-- No MAXLEN on the XADDs: the streams are trimmed by trim.lua, only below what every consumer
-- group has read (gateway/queueing/backlog.py), never on the hot path.
local KEYS, ARGV = KEYS, ARGV  -- upvalues: each use is no look-up in the globals
local zsets, zorder = {}, {}  -- key -> {score, member, ...}, in the order first seen
local volumes, vorder = {}, {}  -- bucket key -> {fields = {field -> n}, order = {field...}}
local function index(key, score, member)
  local t = zsets[key]
  if not t then
    t = {}
    zsets[key] = t
    zorder[#zorder + 1] = key
  end
  t[#t + 1], t[#t + 2] = score, member
end

-- What the contact under way has taken, for the main loop to give back if it fails before it
-- can be read (its stream entry): its dedupe key claimed, the rate counters it counted and the
-- sender's 'first' key it made.
local claimed, counted, visible, kept = nil, {}, false, nil

-- Gives back what the contact under way has taken (KEYS from kb on are its own): a contact
-- over a rate limit, and one that failed before it could be read.
local function give_back(kb)
  for _, key in ipairs(counted) do
    redis.call('DECR', key)
  end
  redis.call('DEL', claimed)
  if kept then
    redis.call('DEL', kept)
  end
end

local function contact(kb, nk, ab)
  local id = ARGV[ab + 1]
  -- SET NX GET (Redis 7.0): the dedupe lookup and the claim in one command
  local original = redis.call('SET', KEYS[kb + 1], id, 'NX', 'GET', 'EX', ARGV[2])
  if original then
    return {0, original, 0}
  end
  claimed = KEYS[kb + 1]
  local received = ARGV[ab + 4]
  local window = tonumber(ARGV[3])
  local repeats = ARGV[ab + 10] == '1' and window >= 1000
  local ms = math.floor(window / 1000)
  -- The sender's 'first' key is made or read before the rate counters: the contact that finds
  -- none (a sender's first contact in the repeat window, the common case) is kept there
  -- alone, its stamp in a string made with its expiry in one command, and counts 0 repeats
  -- without reading the sender's set; every later one while it lives counts it and the set,
  -- goes into the set, and moves the string's expiry to one window from itself, so the string
  -- outlives every contact of the sender in the window. (Older instances read the set alone
  -- and do not move the string's expiry: docs/operations.md, upgrade notes.)
  local first = nil
  if repeats then
    first = redis.call('SET', KEYS[kb + 7], received, 'NX', 'GET', 'PX', ms)
    if not first then
      kept = KEYS[kb + 7]
    end
  end
  for i = 8, nk do
    local at = ab + 13 + 4 * (i - 8)
    local key, length = KEYS[kb + i], tonumber(ARGV[at + 1])
    -- The sender's counter, when the repeat window covers its window: the contact that made
    -- the 'first' string had no contact of its sender in the window, so it is not over the
    -- limit and makes no counter; the sender's next contact in the window counts it.
    local covered = repeats and ARGV[at + 3] == '1' and window >= 1000 * length
    if not (covered and not first) then
      -- the window's first contact makes the counter and its expiry in one command (a
      -- sender's first contact in a window is the common case); a later one counts with INCR
      local n = 1
      if redis.call('SET', key, 1, 'NX', 'GET', 'PX', length) then
        n = redis.call('INCR', key)
      elseif covered then
        -- the counter is new: the sender's latest contact (the 'first' string's PTTL says
        -- when) counted none, so it is the one that made the string; it is counted here
        -- when it came in this window (as far as the window has run, in ms)
        local since = ms - redis.call('PTTL', KEYS[kb + 7])
        if since <= length - tonumber(ARGV[at + 2]) then
          n = redis.call('INCR', key)
        end
      end
      counted[#counted + 1] = key
      if n > tonumber(ARGV[at]) then
        give_back(kb)
        return {2, ARGV[at + 2], 0}
      end
    end
  end
  local count = 0
  if first then
    -- Bounds are written out as exact integers: Lua's own number-to-string keeps 14 digits,
    -- which rounded a microsecond stamp up or down at random. The count is inclusive:
    -- contacts of one batch share one edge stamp and count in the order they were written.
    -- The count reads the window alone, so the members that left it are taken off only when
    -- there is a count to make.
    local since = string.format('%.0f', tonumber(received) - window)
    count = redis.call('ZCOUNT', KEYS[kb + 2], since, received)
    local at = tonumber(first)
    if at and at >= tonumber(since) and at <= tonumber(received) then
      count = count + 1
    end
    if count > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[kb + 2], '-inf', '(' .. since)
    end
    redis.call('ZADD', KEYS[kb + 2], received, id)
    redis.call('PEXPIRE', KEYS[kb + 2], ms)
    redis.call('PEXPIRE', KEYS[kb + 7], ms)
  end
  local json = ARGV[ab + 2] .. count .. ARGV[ab + 3]
  redis.call('XADD', KEYS[1], '*', 'contact', json, 'id', id, 'channel', ARGV[ab + 8])
  visible = true
  -- The event and the contact's one HSET (its fields, its first event's index entry, its
  -- dashboard outcome) with their arguments written out: no table to build and unpack a
  -- contact.
  local event, surge = nil, ARGV[ab + 12]
  if surge == '' then
    event = redis.call('XADD', KEYS[2], '*', 'event', ARGV[ab + 7], 'contact_id', id,
      'type', 'enqueued', 'counted', count)
  elseif count < 2 then
    event = redis.call('XADD', KEYS[2], '*', 'event', ARGV[ab + 7], 'contact_id', id,
      'type', 'enqueued', 'counted', count, 'keys', surge)
  else
    -- a repeat contact (the dashboard's, below: the third or later in the window, where the
    -- repeat surge is raised by default): its sender's pseudonym (the last part of the
    -- 'first' key's name), so that the aggregator knows the citizen of a repeat surge it has
    -- already written without reading the contact
    event = redis.call('XADD', KEYS[2], '*', 'event', ARGV[ab + 7], 'contact_id', id,
      'type', 'enqueued', 'counted', count, 'keys', surge,
      'sender', string.match(KEYS[kb + 7], '[^:]*$'))
  end
  redis.call('HSET', KEYS[kb + 3], 'contact', json, 'received_us', received,
    'due_us', ARGV[ab + 5], 'kind', ARGV[ab + 9], 'channel', ARGV[ab + 8],
    'event:' .. event, ARGV[ab + 7], 'agg', 'open:0')
  redis.call('EXPIRE', KEYS[kb + 3], ARGV[4])
  -- written: its index entries and its dashboard volume wait for the batch's end
  index(KEYS[3], ARGV[ab + 5], id)
  index(KEYS[4], ARGV[ab + 6], id)
  index(KEYS[kb + 6], ARGV[ab + 5], id)
  if ARGV[ab + 9] == 'answer' then
    index(KEYS[5], received, id)
  end
  if count >= 2 then
    index(KEYS[6], received, id)
  end
  local volume = ARGV[ab + 11] .. ':volume'
  for b = 4, 5 do
    local key = KEYS[kb + b]
    local t = volumes[key]
    if not t then
      t = {fields = {}, order = {}}
      volumes[key] = t
      vorder[#vorder + 1] = key
    end
    if not t.fields[volume] then
      t.order[#t.order + 1] = volume
    end
    t.fields[volume] = (t.fields[volume] or 0) + 1
  end
  return {1, id, count}
end

local replies = {}
local n = tonumber(ARGV[1])
local kb, ab = 6, 5 + 2 * n
for c = 1, n do
  local nk, na = tonumber(ARGV[4 + 2 * c]), tonumber(ARGV[5 + 2 * c])
  -- a contact the server refuses (a key of the wrong type...) fails alone
  claimed, counted, visible, kept = nil, {}, false, nil
  local ok, reply = pcall(contact, kb, nk, ab)
  if not ok then
    reply = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
    if claimed and not visible then
      -- nothing of it can be read: its dedupe key and counters are given back, so that the
      -- peer's retry is written (else it is "a duplicate" of a contact never written)
      pcall(give_back, kb)
    end
  end
  replies[c] = reply
  kb, ab = kb + nk, ab + na
end
for _, key in ipairs(zorder) do
  local t = zsets[key]
  for i = 1, #t, 1000 do  -- unpack's bound on the stack
    redis.call('ZADD', key, unpack(t, i, math.min(#t, i + 999)))
  end
end
-- a bucket is made by the first volume of a label in it, which sets its expiry
for _, key in ipairs(vorder) do
  local t = volumes[key]
  for _, field in ipairs(t.order) do
    local by = t.fields[field]
    if redis.call('HINCRBY', key, field, by) == by then
      redis.call('EXPIRE', key, ARGV[5])
    end
  end
end
return replies
