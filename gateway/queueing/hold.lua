-- Keep an entry this consumer is still working on from being reclaimed by another instance:
-- reset its idle time, but only while this consumer owns it (a plain XCLAIM would steal it back).
-- KEYS: 1 stream
-- ARGV: 1 group, 2 entry id, 3 consumer
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then
  return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
