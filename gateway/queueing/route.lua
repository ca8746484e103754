-- Route a reply from the public replies stream to the stream of the contact's adapter, once:
-- only the call whose XACK takes the entry off the router group's pending list writes the copy,
-- so of two instances racing for one entry (a reclaim), exactly one routes it.
-- KEYS: 1 public replies stream, 2 the adapter's reply stream, 3 set of adapters with replies
-- ARGV: 1 group, 2 public entry id, 3 reply JSON, 4 contact id, 5 adapter
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return false
end
-- The adapter's group exists from the first reply on, so a reply held while no instance runs
-- the adapter is read by the first one that does (and the trimmer keeps it until then).
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
local entry = redis.call('XADD', KEYS[2], '*', 'reply', ARGV[3], 'contact_id', ARGV[4],
  'routed_from', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[5])
return entry
