-- Admits a bulk job: if its client has fewer open jobs than the limit, stores the job's
-- record and the results already known, marks it open and leases it to this replica, all in
-- one step (so two replicas cannot both admit a client's last allowed job).
--
-- KEYS[1]  the open jobs (`<prefix>:jobs`, a hash: job id -> client tag).
-- KEYS[2]  the job's sealed record (`<prefix>:job:<id>`).
-- KEYS[3]  its results (`<prefix>:job:<id>:results`, a hash: item index -> sealed result).
-- KEYS[4]  its lease (`<prefix>:job:<id>:lease`).
-- ARGV[1]  the job id; ARGV[2] the client's tag; ARGV[3] the limit of open jobs per client;
-- ARGV[4]  the sealed record; ARGV[5] this replica's id; ARGV[6] the lease, in ms;
-- ARGV[7..] pairs: an item index and its sealed result.
--
-- Returns 1 if the job was admitted, 0 if its client already has the limit of open jobs.
local open = 0
for _, tag in ipairs(redis.call('HVALS', KEYS[1])) do
  if tag == ARGV[2] then
    open = open + 1
  end
end
if open >= tonumber(ARGV[3]) then
  return 0
end
redis.call('SET', KEYS[2], ARGV[4])
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[6])
return 1
