-- Intake: one atomic write of a new contact, or the id of the first one (dedupe).
-- Every event of a contact is also kept in its hash as field 'event:<entry id>' (the per-contact
-- index the API reads), so it expires with the contact.
-- The dashboard's first step ("open", gateway/cases/dashboard/aggregates.py) is taken here, in
-- the same atomic write: the volume of the minute and hour buckets, the hash's 'agg' field, the
-- label's open zset, the waiting calls, the repeat contacts. The 'enqueued' event says so
-- (field 'counted', the repeat count), so the aggregator skips it without reading the contact;
-- its field 'surge' carries the contact's surge keys (JSON [received us, key, ...]) and the
-- hash's field 'surge' marks them not yet counted (the aggregator HDELs it: once a contact).
-- KEYS: 1 contacts stream, 2 events stream, 3 dedupe key, 4 sender zset, 5 contact hash,
--       6 deadlines zset, 7 warnings zset, 8 minute bucket, 9 hour bucket, 10 open zset of the
--       label, 11 waiting zset (calls), 12 repeats zset
-- ARGV: 1 id, 2 contact JSON before the repeat count, 3 contact JSON after it,
--       4 dedupe ttl (s), 5 repeat window (us), 6 received_at (us), 7 due_at (us),
--       8 warn_at (us), 9 enqueued event JSON, 10 retention (s), 11 channel,
--       12 deadline kind, 13 count repeats (1/0), 14 label (the dashboard's row),
--       15 bucket ttl (s), 16 surge keys ('' = none),
--       then for each rate counter KEYS[13..] (a fixed window of one sender or adapter):
--       its limit, the window length (ms) and the ms left in the window, from ARGV[17]
-- A duplicate passes before the rate limits: a peer's retry is never "too many".
-- Rate limited: {2, ms until that window ends, 0}; nothing written, nothing counted (the
-- dedupe key and the counters taken are given back).
-- No MAXLEN on the XADDs: the streams are trimmed by trim.lua, only below what every consumer
-- group has read (gateway/queueing/backlog.py), never on the hot path.
local id = ARGV[1]
-- SET NX GET (Redis 7.0): the dedupe lookup and the claim in one command
local first = redis.call('SET', KEYS[3], id, 'NX', 'GET', 'EX', ARGV[4])
if first then
  return {0, first, 0}
end
for i = 13, #KEYS do
  local at = 17 + 3 * (i - 13)
  local n = redis.call('INCR', KEYS[i])
  if n == 1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[at + 1])
  end
  if n > tonumber(ARGV[at]) then
    for j = 13, i do
      redis.call('DECR', KEYS[j])
    end
    redis.call('DEL', KEYS[3])
    return {2, ARGV[at + 2], 0}
  end
end
local received = tonumber(ARGV[6])
local count = 0
if ARGV[13] == '1' then
  local window = tonumber(ARGV[5])
  -- Bounds are written out as exact integers: Lua's own number-to-string keeps 14 digits,
  -- which rounded a microsecond stamp up or down at random. The count is inclusive: contacts
  -- of one batch share one edge stamp and count in the order they were written.
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%.0f', received - window))
  count = redis.call('ZCOUNT', KEYS[4], '-inf', ARGV[6])
  redis.call('ZADD', KEYS[4], received, id)
  redis.call('PEXPIRE', KEYS[4], math.floor(window / 1000))
end
local contact = ARGV[2] .. count .. ARGV[3]
local entry = redis.call('XADD', KEYS[1], '*',
  'contact', contact, 'id', id, 'channel', ARGV[11])
local fields = {'event', ARGV[9], 'contact_id', id, 'type', 'enqueued', 'counted', count}
if ARGV[16] ~= '' then
  fields[#fields + 1], fields[#fields + 2] = 'surge', ARGV[16]
end
local event = redis.call('XADD', KEYS[2], '*', unpack(fields))
-- One HSET for the contact's fields, its first event's index entry and its dashboard outcome
-- (and the mark that its surge keys are not yet counted).
fields = {'contact', contact, 'entry', entry, 'received_us', ARGV[6], 'due_us', ARGV[7],
  'kind', ARGV[12], 'channel', ARGV[11], 'event:' .. event, ARGV[9], 'agg', 'open:0'}
if ARGV[16] ~= '' then
  fields[#fields + 1], fields[#fields + 2] = 'surge', 1
end
redis.call('HSET', KEYS[5], unpack(fields))
redis.call('EXPIRE', KEYS[5], ARGV[10])
redis.call('ZADD', KEYS[6], ARGV[7], id)
redis.call('ZADD', KEYS[7], ARGV[8], id)
-- the dashboard's "open" step (aggregate.lua's, for a contact it has not seen): a bucket is
-- made by the first volume of a label in it, which sets its expiry
local volume = ARGV[14] .. ':volume'
for b = 8, 9 do
  if redis.call('HINCRBY', KEYS[b], volume, 1) == 1 then
    redis.call('EXPIRE', KEYS[b], ARGV[15])
  end
end
redis.call('ZADD', KEYS[10], ARGV[7], id)
if ARGV[12] == 'answer' then
  redis.call('ZADD', KEYS[11], ARGV[6], id)
end
if count >= 2 then
  redis.call('ZADD', KEYS[12], ARGV[6], id)
end
return {1, id, count}
