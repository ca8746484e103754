-- Service-level counters: move contacts to a better-ranked outcome, once each (see
-- gateway/cases/dashboard/aggregates.py): the dashboard's reader's steps of the events it
-- reads that their writers did not take (aggstep.lua, put before this text, takes each).
-- One call takes a batch of steps: 6 keys and 13 arguments each, laid out as aggstep.lua
-- says. Returns one flag per step: 1 when the step asked to mark the contact counted for
-- surges and it was not yet (field 'surged').
local flags = {}
for step = 0, #KEYS / 6 - 1 do
  flags[#flags + 1] = agg_step(step * 6, step * 13)
end
agg_flush(false)
return flags
