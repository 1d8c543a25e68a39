-- A replica back from fallback: no shared slot before the fence, so that replicas still on
-- their fallback grid (they notice Redis's return a health check later) are not crowded.
--
-- KEYS[1]  the schedule hash (`<prefix>:pace`, see book.lua): its `fence`, like its
--          `penalty`, is a time before which no slot is booked, not a booked slot.
-- ARGV[1]  the fence, µs from Redis's now.
--
-- Returns Redis's now, µs (a clock sample for the replica).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fence = now + tonumber(ARGV[1])
local held = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if fence > held then
  redis.call('HSET', KEYS[1], 'fence', string.format('%d', fence))
  redis.call('PEXPIRE', KEYS[1], 86400000)
end
return now
