-- wrk script for the cache-hit scenario: rotates over the request paths listed one per
-- line in the file named by $BENCH_KEYS (1 key or 10 000), and prints a one-line JSON
-- summary with p50/p99/p99.9 that the benchmark harness parses.
--
--   BENCH_KEYS=keys.txt wrk -t2 -c64 -d10s -s bench/wrk.lua http://127.0.0.1:PORT
--
-- Each thread starts at a different offset so that threads do not walk the keys in step.

local paths = {}
local next_index = 1

local function load_paths()
  local file = os.getenv("BENCH_KEYS")
  if file == nil then
    error("BENCH_KEYS must name a file of request paths")
  end
  for line in io.lines(file) do
    if line ~= "" then
      paths[#paths + 1] = line
    end
  end
  if #paths == 0 then
    error("no request paths in " .. file)
  end
end

local thread_count = 0
function setup(thread)
  thread:set("offset", thread_count)
  thread_count = thread_count + 1
end

local requests = {}
function init(args)
  load_paths()
  for i, path in ipairs(paths) do
    requests[i] = wrk.format("GET", path)
  end
  next_index = ((tonumber(offset) or 0) * 7919) % #requests + 1
end

function request()
  local r = requests[next_index]
  next_index = next_index + 1
  if next_index > #requests then
    next_index = 1
  end
  return r
end

function done(summary, latency, requests)
  local s = summary
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    s.requests, s.duration, s.bytes,
    s.errors.connect, s.errors.read, s.errors.write, s.errors.status, s.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
