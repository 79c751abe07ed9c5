-- The penalty box: a tenant far over its rate is turned away here, not by the services. The
-- second step of the edge filter (gateway/config.py), after edge identity.
--
-- The services count every call of a tenant in Redis (GCRA) and refuse one over the rate
-- with RESOURCE_EXHAUSTED, ErrorInfo RATE_LIMITED (`limit` rpm_read or rpm_write) and the
-- exact wait until the next call would be admitted (RetryInfo, retry-after-ms). No call of
-- that tenant and class can be admitted before then, so until then this filter answers
-- them itself, with the service's ErrorInfo and the wait that REMAINS.
--
-- After the wait it goes on pacing the tenant, for BOX.pace_ms: GCRA admits one call per
-- interval (60 s / per_minute, from the refusal's ErrorInfo) after the first, so each call let
-- through from the end of the wait on takes the next slot, and a call that comes before its
-- slot is answered here with the wait until that slot. Counting the calls let through, not
-- their answers, is what holds under load: when the service takes longer than an interval to
-- answer, a box that only learned from refusals would have expired before each one came back,
-- and the whole flood would reach the service. A call let through is refused only if it
-- reached Redis more than a moment before its slot (it carries BOX.slot_header, and the
-- service waits a short refusal out: services/runtime/interceptors/rate_limit.py) or something
-- else (another worker, another gateway) took the slot; its refusal gives the slot back (the
-- next call goes), or pushes the box later.
-- Under a flood the service sees, per worker, about one call per interval.
--
-- 1. Only a tenant's own users fill the box or are held by it: the call's verified token
--    (its tenant claim, which jwt_authn puts in BOX.token_tenant_header; the box takes the
--    header off) names the tenant of the host (x-tenant-id, set by edge.lua). A
--    token of tenant b on tenant a's host is refused by the services and counted against b;
--    it never boxes a. Public calls carry no token and pass untouched.
-- 2. Only RATE_LIMITED fills it, for the limit its method counts (BOX.limits, from the
--    services' proto policies), and for at most BOX.max_wait_ms: the wait is exact, so the
--    only slack is a plan raised within it.
-- 3. The box is per Envoy worker (Lua state), bounded to BOX.max_entries live entries.
-- 4. A refusal is held until a retry could succeed, up to BOX.hold_most_ms (and never past the
--    call's own grpc-timeout): a client that calls again the moment it is answered (a closed
--    loop, a retry storm) is paced to its concurrency per hold, instead of costing Envoy
--    thousands of refusals a second. Lua has no timer, so the refusal goes to Envoy's C++ path:
--    its values in request headers (BOX.hold_headers), the hold in BOX.delay_header, and the
--    route cache cleared, so that the hold route (gateway/config.py: first in every virtual
--    host, matched on those headers, which no client can send) answers it after the fault
--    filter's delay, with the wait that remains then. Past the fault filter's cap on calls
--    held at once, the same route answers at once.
--
-- BOX is defined above this text by gateway/config.py.

local REFUSED = tostring(BOX.code)
local box = {} -- "<tenant> <limit>" -> {from_ms, interval_ms, sent, generation, expires_ms, message, info}
local entries = 0
local generations = 0

local function sweep(now)
  for key, entry in pairs(box) do
    if entry.expires_ms <= now then
      box[key] = nil
      entries = entries - 1
    end
  end
end

-- Protobuf, as much as a google.rpc.Status needs: varints and length-delimited fields.

local function read_varint(bytes, pos)
  local value, scale = 0, 1
  while true do
    local byte = bytes:byte(pos)
    if byte == nil then
      return nil, pos
    end
    pos = pos + 1
    value = value + (byte % 128) * scale
    if byte < 128 then
      return value, pos
    end
    scale = scale * 128
  end
end

-- Calls visit(number, value) for each field of a message; false if it is not one.
local function each_field(bytes, visit)
  local pos = 1
  while pos <= #bytes do
    local key, value, length
    key, pos = read_varint(bytes, pos)
    if key == nil then
      return false
    end
    local wire = key % 8
    if wire == 0 then
      value, pos = read_varint(bytes, pos)
    elseif wire == 2 then
      length, pos = read_varint(bytes, pos)
      if length == nil or pos + length - 1 > #bytes then
        return false
      end
      value = bytes:sub(pos, pos + length - 1)
      pos = pos + length
    else
      return false
    end
    if value == nil then
      return false
    end
    visit((key - wire) / 8, value)
  end
  return true
end

-- Fields 1 and 2 of a message: an Any's type and value, a map entry's key and value.
local function first_two(bytes)
  local first, second = nil, nil
  each_field(bytes, function(number, value)
    if number == 1 then
      first = value
    elseif number == 2 then
      second = value
    end
  end)
  return first, second
end

local function varint(n)
  local out = {}
  repeat
    local byte = n % 128
    n = (n - byte) / 128
    out[#out + 1] = string.char(n > 0 and byte + 128 or byte)
  until n == 0
  return table.concat(out)
end

local function bytes_field(number, bytes)
  return varint(number * 8 + 2) .. varint(#bytes) .. bytes
end

local function varint_field(number, n)
  if n == 0 then
    return ""
  end
  return varint(number * 8) .. varint(n)
end

-- The service's RATE_LIMITED details: Status.message, the ErrorInfo (as its Any), its limit
-- and per_minute; nil for any other status.
local function rate_limited(status)
  local message, info, limit, per_minute = "", nil, nil, nil
  local parsed = each_field(status, function(number, value)
    if number == 2 then
      message = value
    elseif number == 3 then
      local type_url, packed = first_two(value)
      if type_url ~= BOX.error_info_type or packed == nil then
        return
      end
      local reason, found, rate = nil, nil, nil
      each_field(packed, function(n, v)
        if n == 1 then
          reason = v
        elseif n == 3 then
          local key, val = first_two(v)
          if key == BOX.limit_key then
            found = val
          elseif key == BOX.per_minute_key then
            rate = val
          end
        end
      end)
      if reason == BOX.reason then
        info, limit, per_minute = value, found, rate
      end
    end
  end)
  if not parsed or info == nil then
    return nil
  end
  return message, info, limit, per_minute
end

local function grpc_message(text)
  return (text:gsub("[^ -$&-~]", function(c)
    return string.format("%%%02X", c:byte())
  end))
end

-- The whole milliseconds a refusal of wait_ms is held: up to the wait (less the 1 ms a refusal
-- always leaves), to BOX.hold_most_ms, and to BOX.hold_margin_ms before the call's own deadline.
local TIMEOUT_UNIT_MS = { H = 3600000, M = 60000, S = 1000, m = 1, u = 0.001, n = 0.000001 }

local function hold_for(headers, wait_ms)
  local hold = math.min(wait_ms - 1, BOX.hold_most_ms)
  local timeout = headers:get("grpc-timeout")
  if timeout ~= nil then
    local amount, unit = timeout:match("^(%d+)([HMSmun])$")
    if amount == nil then
      return 0
    end
    hold = math.min(hold, math.floor(tonumber(amount) * TIMEOUT_UNIT_MS[unit]) - BOX.hold_margin_ms)
  end
  return math.max(hold, 0)
end

local function refuse(handle, headers, entry, wait_ms)
  local hold = hold_for(headers, wait_ms)
  wait_ms = wait_ms - hold -- what remains when the refusal is answered
  local seconds = math.floor(wait_ms / 1000)
  local duration = varint_field(1, seconds) .. varint_field(2, (wait_ms - seconds * 1000) * 1000000)
  local retry = bytes_field(1, BOX.retry_info_type) .. bytes_field(2, bytes_field(1, duration))
  local message = entry.message:gsub("retry in [%d.]+s", string.format("retry in %.3fs", wait_ms / 1000))
  local status = varint_field(1, BOX.code) .. bytes_field(2, message) .. bytes_field(3, entry.info) .. bytes_field(3, retry)
  local details = (handle:base64Escape(status):gsub("=+$", ""))
  if hold < 1 then
    handle:respond({
      [":status"] = "200",
      ["content-type"] = "application/grpc",
      ["grpc-status"] = REFUSED,
      ["grpc-message"] = grpc_message(message),
      ["grpc-status-details-bin"] = details,
      [BOX.retry_header] = tostring(wait_ms),
    }, "")
    return
  end
  -- Held by Envoy (the hold route), then answered with these values.
  headers:replace(BOX.hold_headers.message, grpc_message(message))
  headers:replace(BOX.hold_headers.retry, tostring(wait_ms))
  headers:replace(BOX.hold_headers.details, details)
  headers:replace(BOX.delay_header, tostring(hold))
  handle:clearRouteCache()
end

local function on_request(handle, headers)
  -- The tenant of the call's verified token (none without one, or for a tenant issuer's).
  local token_tenant = headers:get(BOX.token_tenant_header)
  if token_tenant == nil then
    return
  end
  headers:remove(BOX.token_tenant_header)
  local tenant = headers:get("x-tenant-id")
  local limit = BOX.limits[headers:get(":path") or ""]
  if tenant == nil or limit == nil or token_tenant ~= tenant then
    return
  end
  local key = tenant .. " " .. limit
  local entry = box[key]
  local now = handle:timestamp()
  local metadata = handle:streamInfo():dynamicMetadata()
  local generation = nil
  if entry ~= nil then
    if now >= entry.expires_ms then
      box[key] = nil
      entries = entries - 1
    else
      -- The slot this call would take: one interval after each call already let through.
      local due = entry.from_ms + entry.sent * entry.interval_ms
      if now < due then
        refuse(handle, headers, entry, math.ceil(due - now)) -- whole ms, as the service's (the interval need not be)
        return
      end
      entry.sent = entry.sent + 1
      generation = entry.generation
      -- A service that finds this call a little early for its slot waits for it (a few ms).
      headers:replace(BOX.slot_header, "1")
    end
  end
  -- One entry for what the response side needs (each set is a metadata merge in Envoy).
  metadata:set(BOX.namespace, "call", { key = key, limit = limit, sent_ms = now, generation = generation })
end

local function on_response(handle)
  local headers = handle:headers()
  -- A refusal is a Trailers-Only reply: its status is in the headers.
  if headers:get("grpc-status") ~= REFUSED then
    return
  end
  local box_metadata = handle:streamInfo():dynamicMetadata():get(BOX.namespace)
  local call = box_metadata and box_metadata["call"]
  local wait_ms = tonumber(headers:get(BOX.retry_header) or "")
  local details = headers:get("grpc-status-details-bin")
  if call == nil or wait_ms == nil or wait_ms < 1 or details == nil then
    return
  end
  local message, info, limit, per_minute = rate_limited(handle:base64Decode(details))
  per_minute = tonumber(per_minute or "")
  if message == nil or limit ~= call["limit"] or per_minute == nil or per_minute < 1 then
    return
  end
  local key = call["key"]
  local entry = box[key]
  if entry ~= nil and handle:timestamp() >= entry.expires_ms then
    box[key] = nil
    entries = entries - 1
    entry = nil
  end
  if entry ~= nil and call["generation"] == entry.generation and entry.sent > 0 then
    -- A call let through for a slot was refused after all (it reached Redis a little before
    -- the slot, or another gateway took it): the slot is still there, for the next call.
    entry.sent = entry.sent - 1
  end
  -- The wait counts from when the call left here, before the service asked Redis: never later
  -- than the moment Redis admits the next call.
  local from_ms = call["sent_ms"] + math.min(math.floor(wait_ms), BOX.max_wait_ms)
  if entry ~= nil and from_ms <= entry.from_ms + entry.sent * entry.interval_ms then
    return -- it holds the tenant at least as long already
  end
  if entry == nil then
    if entries >= BOX.max_entries then
      sweep(handle:timestamp())
      if entries >= BOX.max_entries then
        return
      end
    end
    entries = entries + 1
  end
  generations = generations + 1
  box[key] = {
    from_ms = from_ms,
    -- GCRA admits one call per interval after the first: each call let through from from_ms on
    -- takes the next slot, and a call that comes before its slot is answered here.
    interval_ms = 60000 / per_minute,
    sent = 0,
    generation = generations,
    expires_ms = from_ms + BOX.pace_ms,
    message = message,
    info = info,
  }
end

return { on_request = on_request, on_response = on_response }
