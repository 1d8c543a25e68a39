-- Breaks a flight lease whose holder is no longer alive: a replica that died mid-flight
-- would otherwise keep its lookup's followers waiting for its whole deadline.
--
-- KEYS[1]  the lease (`<prefix>:flight:<tag>`).
-- ARGV[1]  what every replica's liveness key starts with (`<prefix>:alive:`); a replica's
--          key is that and its id, set for a few seconds at each health check.
--
-- Returns 1 if the lease was broken (its holder is gone), 0 otherwise.
local holder = redis.call('GET', KEYS[1])
if holder and redis.call('EXISTS', ARGV[1] .. holder) == 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
