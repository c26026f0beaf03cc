-- wrk script: POST one prepared body (a file) to the server, over and over.
--
--   WRK_BODY=/path/to/body.pkl WRK_CONTENT_TYPE=application/x-pickle \
--     wrk -t1 -c64 -d5s --latency -s bench/wrk_post.lua http://127.0.0.1:5000/
--
-- WRK_BODY (required) names the body file; WRK_CONTENT_TYPE defaults to application/x-pickle;
-- WRK_TOKEN, when set, is sent as "Authorization: Bearer <token>".
-- At the end it prints one line "WRKJSON {...}" with exact figures (microseconds) that
-- bench_server.py / bench_wsgi.py read along with wrk's own --latency table.

local path = os.getenv("WRK_BODY")
if path == nil or path == "" then
  error("set WRK_BODY to the file holding the request body")
end
local f = assert(io.open(path, "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/x-pickle"
local token = os.getenv("WRK_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "mean_us": %.1f, "max_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeouts": %d, "status_errors": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max,
    e.connect, e.read, e.write, e.timeout, e.status))
end
