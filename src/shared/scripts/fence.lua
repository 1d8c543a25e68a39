-- A replica back from fallback: no shared slot before the fence, so that replicas still on
-- their fallback grid are not crowded. Every replica keeps calling at its grid positions
-- until a position before the fence, so the fence costs the fleet no idle time; a fence
-- still ahead is kept as it is (the first replica back set it, and the others may already
-- have booked shared slots behind it).
--
-- KEYS[1]  the schedule hash (`<prefix>:pace`, see book.lua): its `fence`, like its
--          `penalty`, is a time before which no slot is booked, not a booked slot.
-- ARGV[1]  the fence, µs from Redis's now, if none is ahead yet.
--
-- Returns {Redis's now, the fence}, µs since the epoch on Redis's clock (the first is a clock
-- sample for the replica).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local held = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if held > now then
  return {now, held}
end
local fence = now + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'fence', string.format('%d', fence))
redis.call('PEXPIRE', KEYS[1], 86400000)
return {now, fence}
