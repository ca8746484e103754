-- Intake: one atomic write of a new contact, or the id of the first one (dedupe).
-- Every event of a contact is also kept in its hash as field 'event:<entry id>' (the per-contact
-- index the API reads), so it expires with the contact.
-- KEYS: 1 contacts stream, 2 events stream, 3 dedupe key, 4 sender zset, 5 contact hash,
--       6 deadlines zset, 7 warnings zset
-- ARGV: 1 id, 2 contact JSON before the repeat count, 3 contact JSON after it,
--       4 dedupe ttl (s), 5 repeat window (us), 6 received_at (us), 7 due_at (us),
--       8 warn_at (us), 9 enqueued event JSON, 10 retention (s), 11 channel,
--       12 deadline kind, 13 count repeats (1/0),
--       then for each rate counter KEYS[8..] (a fixed window of one sender or adapter):
--       its limit, the window length (ms) and the ms left in the window, from ARGV[14]
-- A duplicate passes before the rate limits: a peer's retry is never "too many".
-- Rate limited: {2, ms until that window ends, 0}; nothing written, nothing counted.
-- No MAXLEN on the XADDs: the streams are trimmed by trim.lua, only below what every consumer
-- group has read (gateway/queueing/backlog.py), never on the hot path.
local first = redis.call('GET', KEYS[3])
if first then
  return {0, first, 0}
end
for i = 8, #KEYS do
  local at = 14 + 3 * (i - 8)
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= tonumber(ARGV[at]) then
    return {2, ARGV[at + 2], 0}
  end
end
for i = 8, #KEYS do
  if redis.call('INCR', KEYS[i]) == 1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[14 + 3 * (i - 8) + 1])
  end
end
local id = ARGV[1]
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
redis.call('SET', KEYS[3], id, 'EX', ARGV[4])
local event = redis.call('XADD', KEYS[2], '*',
  'event', ARGV[9], 'contact_id', id, 'type', 'enqueued')
-- One HSET for the contact's fields and its first event's index entry.
redis.call('HSET', KEYS[5], 'contact', contact, 'entry', entry, 'received_us', ARGV[6],
  'due_us', ARGV[7], 'kind', ARGV[12], 'channel', ARGV[11], 'event:' .. event, ARGV[9])
redis.call('EXPIRE', KEYS[5], ARGV[10])
redis.call('ZADD', KEYS[6], ARGV[7], id)
redis.call('ZADD', KEYS[7], ARGV[8], id)
return {1, id, count}
