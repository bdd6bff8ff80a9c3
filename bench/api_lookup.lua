-- wrk script for bench/api_lookup.py: keep-alive POSTs from a file of prepared requests.
--
--   wrk -t1 -c8 -d10s --latency -s bench/api_lookup.lua https://127.0.0.1:PORT -- REQUESTS_FILE AUTHORIZATION
--
-- REQUESTS_FILE has one request per line: "<path> <JSON body>".  Each wrk thread cycles through all of
-- them, starting at a different place.  All requests carry the same headers (Content-Type, Accept and,
-- when AUTHORIZATION is not "-", Authorization).  HTTP/1.1 keeps the connection open.
--
-- Any answer other than 200 is counted.  done() prints one machine-readable line for the bench:
--   WRKJSON {"requests": ..., "bad": ..., "p50": <us>, ...}
-- and, if there were any, one line with the first bad answer:
--   WRKBAD <status> <first 200 bytes of the body>

local threads = {}

local requests = {}
local count = 0
local next_index = 0

bad = 0 -- answers other than 200, read by done() via thread:get
first_bad = ""

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_no", #threads)
end

function init(args)
  local file, authorization = args[1], args[2]
  if file == nil then
    error("usage: wrk ... -s api_lookup.lua URL -- REQUESTS_FILE AUTHORIZATION")
  end
  local headers = { ["Content-Type"] = "application/json", ["Accept"] = "application/json" }
  if authorization ~= nil and authorization ~= "-" then
    headers["Authorization"] = authorization
  end
  for line in io.lines(file) do
    local path, body = line:match("^(%S+) (.*)$")
    if path ~= nil then
      count = count + 1
      requests[count] = wrk.format("POST", path, headers, body)
    end
  end
  if count == 0 then
    error("no requests in " .. file)
  end
  next_index = ((thread_no or 1) - 1) * 7919 % count
end

function request()
  next_index = next_index % count + 1
  return requests[next_index]
end

function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
    if first_bad == "" then
      first_bad = tostring(status) .. " " .. string.sub(body or "", 1, 200):gsub("[\r\n]", " ")
    end
  end
end

function done(summary, latency, requests)
  local total_bad, first = 0, ""
  for _, thread in ipairs(threads) do
    total_bad = total_bad + (thread:get("bad") or 0)
    local fb = thread:get("first_bad") or ""
    if first == "" and fb ~= "" then
      first = fb
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, '
      .. '"status": %d, "timeout": %d, "bad": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d, '
      .. '"mean": %.1f, "max": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    total_bad, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max
  ))
  if first ~= "" then
    io.write("WRKBAD " .. first .. "\n")
  end
end
