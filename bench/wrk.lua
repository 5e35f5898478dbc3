-- wrk script for every productsvc benchmark workload. Arguments after "--"
-- are key=value pairs:
--   mode=get|list|category|search|create|adjust_hot|mix|hold_confirm|writes   (required)
--   n=10000          products seeded (ids 1..n)
--   token=TOKEN      bearer token for writes
--   nonce=STRING     makes skus unique across runs and repeats
-- Requests that do not change are built once in init, so wrk spends its CPU on
-- the network rather than on string formatting.

local categories, words = {}, {
  "steel", "wooden", "organic", "portable", "wireless", "compact", "premium", "classic",
}
for i = 0, 19 do categories[#categories + 1] = string.format("cat-%02d", i) end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local mode, n, nonce, counter = nil, 10000, "x", 0
local reqs, write_headers = {}, nil

local function adjust(id)
  return wrk.format("POST", "/products/" .. id .. "/stock/adjustments", write_headers, '{"delta":1}')
end

local function create()
  counter = counter + 1
  local body = string.format(
    '{"sku":"b-%s-%d-%d-%d","name":"bench %s widget %d","description":"created by the benchmark","category":"%s","price_cents":%d}',
    nonce, tid or 0, counter, math.random(1, 1e6), words[math.random(#words)], counter,
    categories[math.random(#categories)], math.random(100, 100000))
  return wrk.format("POST", "/products", write_headers, body)
end

-- hold_confirm: holds waiting for their confirm, as the Location of each 201.
-- The queue is the thread's, so a confirm may go out on another of its
-- connections than the hold did; each request is one transition either way.
local holds, hold_first, hold_last = {}, 1, 0

local function hold_confirm_response(status, headers, body)
  if status ~= 201 then return end
  local loc = headers["Location"] or headers["location"]
  if loc then
    hold_last = hold_last + 1
    holds[hold_last] = loc
  end
end

function init(args)
  local opts = {}
  for _, a in ipairs(args) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k then opts[k] = v end
  end
  mode = opts.mode or error("wrk.lua: mode=... is required")
  n = tonumber(opts.n or "10000")
  nonce = opts.nonce or tostring(os.time())
  write_headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. (opts.token or "bench-token"),
  }
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919 + math.floor(os.clock() * 1e6))

  if mode == "get" or mode == "mix" then
    for i = 1, n do reqs[i] = wrk.format("GET", "/products/" .. i) end
  elseif mode == "list" then
    reqs[1] = wrk.format("GET", "/products?limit=20")
  elseif mode == "category" then
    for i, c in ipairs(categories) do
      reqs[i] = wrk.format("GET", "/products?category=" .. c .. "&sort=-price_cents&limit=20")
    end
  elseif mode == "search" then
    for i, w in ipairs(words) do reqs[i] = wrk.format("GET", "/products?q=" .. w .. "&limit=20") end
  elseif mode == "adjust_hot" then
    for i = 1, 4 do reqs[i] = adjust(i) end
  elseif mode == "hold_confirm" then
    for i = 1, 4 do
      reqs[i] = wrk.format("POST", "/reservations", write_headers,
        '{"reference":"bench-' .. nonce .. '","lines":[{"product_id":' .. i .. ',"quantity":1}]}')
    end
    response = hold_confirm_response -- set here so other modes skip header parsing
  elseif mode ~= "create" and mode ~= "writes" then
    error("wrk.lua: unknown mode " .. mode)
  end
end

function request()
  if mode == "create" then
    return create()
  elseif mode == "hold_confirm" then
    if hold_first <= hold_last then
      local loc = holds[hold_first]
      holds[hold_first] = nil
      hold_first = hold_first + 1
      return wrk.format("POST", loc .. "/confirm", write_headers)
    end
    return reqs[math.random(#reqs)]
  elseif mode == "writes" then
    if math.random(2) == 1 then return create() end
    return adjust(math.random(n))
  elseif mode == "mix" then
    local id = math.random(n)
    if math.random(10) == 1 then return adjust(id) end
    return reqs[id]
  end
  return reqs[math.random(#reqs)]
end
