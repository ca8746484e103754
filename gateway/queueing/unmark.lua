-- Take a mark off each hash, once: the dashboard aggregator's guard that counts a contact's
-- surge keys once however often its 'enqueued' event is read (intake.lua sets field 'surge').
-- KEYS: the contact hashes. ARGV: 1 the field. Returns one flag per hash: 1 if the mark was
-- there (count it now), 0 if it was taken before or the hash is gone.
local flags = {}
for i = 1, #KEYS do
  flags[i] = redis.call('HDEL', KEYS[i], ARGV[1])
end
return flags
