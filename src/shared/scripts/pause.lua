-- Keeps every start of the fleet off until ARGV[1] µs from Redis's now, and tells every
-- replica on KEYS[2], so that those holding slots inside the pause give them up at their
-- start gate instead of calling into it.
--
-- KEYS[1]  the schedule hash (`<prefix>:pace`, see book.lua).
-- KEYS[2]  the channel every replica listens on (`<prefix>:penalty`).
-- ARGV[1]  how long the pause lasts from Redis's now, µs.
-- ARGV[2]  why: `penalty` (the upstream answered 429) or `hold` (a call left late: it had
--          to open a connection).
--
-- A penalty is also recorded as such (`penalty`, the longest wins), so that every booking
-- starts after it and every booking's reply tells the replica how much of it is left; the
-- message is what is left of the longest penalty, in µs. A hold only moves `next`; its
-- message is `hold:` and its own length, in µs. Returns 1.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local left = tonumber(ARGV[1])
local until_ = now + left
local message
if ARGV[2] == 'penalty' then
  local penalty = tonumber(redis.call('HGET', KEYS[1], 'penalty') or '0')
  if until_ > penalty then
    redis.call('HSET', KEYS[1], 'penalty', until_)
    penalty = until_
  end
  message = string.format('%d', penalty - now)
elseif ARGV[2] == 'hold' then
  message = 'hold:' .. string.format('%d', left)
else
  return redis.error_reply('unknown pause reason: ' .. tostring(ARGV[2]))
end
local next_free = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
if until_ > next_free then
  redis.call('HSET', KEYS[1], 'next', until_)
end
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PUBLISH', KEYS[2], message)
return 1
