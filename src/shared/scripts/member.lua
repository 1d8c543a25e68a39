-- Leases this replica's place among the fleet's expected replicas (time division in
-- fallback: see `division.rs`), renewing it when it holds one already, and reads the
-- fleet's guard that the fallback grid is laid with.
--
-- KEYS[1]  the places hash (`<prefix>:members`): place -> "<replica id>:<lease end µs>".
-- KEYS[2]  the guards hash (`<prefix>:guards`, see book.lua); read only.
-- ARGV[1]  this replica's id.
-- ARGV[2]  how many places there are (`--expected-replicas`).
-- ARGV[3]  how long a lease lasts, µs.
-- ARGV[4]  the place this replica prefers (`--replica-index`, or the one it held), -1: none.
-- ARGV[5]  the guards' horizon, µs (book.lua's ARGV[7]).
--
-- Returns {place, now, fleet_guard}: the place held (-1 if every place is held by live
-- replicas), Redis's time in µs (a clock sample for the replica), and the fleet's guard in
-- µs as a booking would return it now (0 when no replica reported one lately).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local id = ARGV[1]
local count = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local preferred = tonumber(ARGV[4])

local held = -1
local free = {}
for place = 0, count - 1 do
  local value = redis.call('HGET', KEYS[1], tostring(place))
  local holder, ends = nil, nil
  if value then
    holder, ends = string.match(value, '^(.*):(%d+)$')
  end
  if holder == id then
    if held < 0 then
      held = place
    else
      redis.call('HDEL', KEYS[1], tostring(place))
    end
  elseif not holder or tonumber(ends) < now then
    free[place] = true
  end
end
if held < 0 then
  if preferred >= 0 and free[preferred] then
    held = preferred
  else
    for place = 0, count - 1 do
      if free[place] then
        held = place
        break
      end
    end
  end
end
if held >= 0 then
  redis.call('HSET', KEYS[1], tostring(held), string.format('%s:%d', id, now + lease))
end
redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) * 4)

local horizon = tonumber(ARGV[5])
local fleet = 0
local reports = redis.call('HGETALL', KEYS[2])
for i = 1, #reports, 2 do
  local guard, at = string.match(reports[i + 1], '^(%d+):(%d+)$')
  if guard and now - tonumber(at) <= horizon then
    fleet = math.max(fleet, tonumber(guard))
  end
end
return {held, now, fleet}
