-- Renews the leases of the jobs this replica runs, and says what became of each.
--
-- KEYS[1]  the open jobs (`<prefix>:jobs`, a hash: job id -> client tag).
-- KEYS[2], KEYS[4], ...  each job's lease (`<prefix>:job:<id>:lease`);
-- KEYS[3], KEYS[5], ...  each job's record (`<prefix>:job:<id>`), in the same order.
-- ARGV[1]  this replica's id; ARGV[2] the lease, in ms; ARGV[3..] the job ids, in order.
--
-- Returns one number per job: 1 the lease is renewed (or taken again: it had lapsed and no
-- one else took it); 0 another replica holds it now; 2 the job is no longer open (it was
-- cancelled through another replica); 3 Redis no longer has the job at all (it restarted
-- without persistence): the replica writes it again from what it holds.
local out = {}
for i = 3, #ARGV do
  local lease = KEYS[2 * (i - 3) + 2]
  local record = KEYS[2 * (i - 3) + 3]
  if redis.call('EXISTS', record) == 0 then
    out[#out + 1] = 3
  elseif redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    out[#out + 1] = 2
  else
    local holder = redis.call('GET', lease)
    if holder == false or holder == ARGV[1] then
      redis.call('SET', lease, ARGV[1], 'PX', ARGV[2])
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
end
return out
