-- Gives up a flight lease, but only if this replica still holds it (it may have lapsed and
-- been taken by another replica since).
--
-- KEYS[1]  the lease (`<prefix>:flight:<tag>`).
-- ARGV[1]  this replica's id, the value it set the lease to.
--
-- Returns 1 if the lease was deleted, 0 if it was not this replica's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
