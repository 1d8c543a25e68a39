-- Books the next start slot of the fleet's schedule, on Redis's clock, spaced by the fleet's
-- guard: the largest guard any replica reported within the horizon.
--
-- KEYS[1]  the schedule hash (`<prefix>:pace`): `next` is the first free start, `penalty`
--          the end of the latest penalty, `fence` the end of the latest return from
--          fallback (fence.lua), all in µs since the epoch on Redis's clock.
-- KEYS[2]  the guards hash (`<prefix>:guards`): replica id -> "<guard µs>:<reported at µs>".
-- ARGV[1]  1/rate, µs: the interval between starts is this plus the fleet's guard.
-- ARGV[2]  the longest the caller may wait for its slot (from Redis's now), µs.
-- ARGV[3]  how many slots may be booked ahead of this one (the fleet's queue capacity).
-- ARGV[4]  the least lead: the slot is at least this far ahead, µs, so that the replica is
--          waiting for it rather than racing it.
-- ARGV[5]  the guard this replica learned itself, µs.
-- ARGV[6]  this replica's id.
-- ARGV[7]  the horizon, µs: a report older than this no longer counts (its replica stopped
--          booking, or is gone).
--
-- Returns {code, value, penalty_left, now, fleet_guard}, all in µs (`now` absolute, for the
-- replica's clock estimate; `penalty_left` what is left of the penalty from `now`):
--   code 0  booked:   value = the wait until the slot;
--   code 1  full:     value = the wait until a place frees;
--   code 2  too late: value = by how much the slot misses ARGV[2].
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next_free = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
local penalty = tonumber(redis.call('HGET', KEYS[1], 'penalty') or '0')
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local base = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
local lead = tonumber(ARGV[4])
local own = tonumber(ARGV[5])
local horizon = tonumber(ARGV[7])

-- The fleet's guard: this replica's report, and every other one still within the horizon.
redis.call('HSET', KEYS[2], ARGV[6], string.format('%d:%d', own, now))
redis.call('PEXPIRE', KEYS[2], math.ceil(horizon / 1000))
local fleet = own
local reports = redis.call('HGETALL', KEYS[2])
for i = 1, #reports, 2 do
  local guard, at = string.match(reports[i + 1], '^(%d+):(%d+)$')
  if guard and now - tonumber(at) <= horizon then
    fleet = math.max(fleet, tonumber(guard))
  else
    redis.call('HDEL', KEYS[2], reports[i])
  end
end
local interval = base + fleet

-- Waiting for a penalty or a fence is not waiting behind booked slots.
local from = math.max(now, penalty, fence)
local start = math.max(from, next_free, now + lead)
local penalty_left = math.max(0, penalty - now)
if math.floor((start - from) / interval) >= capacity then
  return {1, math.max(0, start - from - capacity * interval), penalty_left, now, fleet}
end
if start - now > max_wait then
  return {2, start - now - max_wait, penalty_left, now, fleet}
end
redis.call('HSET', KEYS[1], 'next', start + interval)
redis.call('PEXPIRE', KEYS[1], 86400000)
return {0, start - now, penalty_left, now, fleet}
