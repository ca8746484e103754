-- The dashboard aggregator's batch is done (gateway/cases/dashboard/aggregates.py): move its
-- cursor on {p}:events past the batch and count the surge keys of the batch's new contacts
-- (their 'enqueued' events' field 'keys'), in one atomic step and only from where this reader
-- read: the cursor string must still hold what the reader started the batch from (compare and
-- set), so a batch's surge keys are counted once even if two readers overlap (a lease handed
-- over while its old holder still runs) or a reader dies mid-batch (nothing counted, the
-- cursor not moved: the next reader reads the batch again). The consumer group
-- 'gateway-aggregate' is moved to the same entry (XGROUP SETID with the group's entries-read
-- counter), so the streams' trimming (trim.lua) and the backlog see the aggregator's progress
-- as they saw its group's, and an older instance's group consumers go on from there.
-- KEYS: 1 events stream, 2 cursor string, 3 surge 'first' string, 4 .. 3+m the batch's surge
--       minute buckets, then per counted (minute, key): its samples list
-- ARGV: 1 group, 2 the cursor string's value the batch was read from ('' = none), 3 the last
--       entry id of the batch, 4 the group's entries-read at it ('' = unknown), 5 the cursor's
--       ttl (s), 6 bucket ttl (s), 7 samples ttl (s), 8 first contact's arrival (us; '' =
--       none), 9 m, 10 samples kept, then per counted (minute, key): its bucket's number
--       (1..m), the key (the bucket's field), the count, the number of sample ids, the ids
-- Returns 1 done; 0 the cursor had moved meanwhile (another reader): nothing written.
local KEYS, ARGV = KEYS, ARGV
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[2] then
  return 0
end
if ARGV[4] ~= '' then
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[3], 'ENTRIESREAD', ARGV[4])
else
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('SET', KEYS[2], ARGV[3] .. ' ' .. ARGV[4], 'EX', ARGV[5])
local m = tonumber(ARGV[9])
local keep = tonumber(ARGV[10])
local a, s = 11, 4 + m
while a <= #ARGV do
  local n = tonumber(ARGV[a + 3])
  redis.call('HINCRBY', KEYS[3 + tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2])
  if n > 0 then
    redis.call('LPUSH', KEYS[s], unpack(ARGV, a + 4, a + 3 + n))
    redis.call('LTRIM', KEYS[s], 0, keep - 1)
    redis.call('EXPIRE', KEYS[s], ARGV[7])
  end
  a, s = a + 4 + n, s + 1
end
for b = 4, 3 + m do
  redis.call('EXPIRE', KEYS[b], ARGV[6])
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[3], ARGV[8], 'NX')
end
return 1
