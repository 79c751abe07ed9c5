-- The penalty box: a tenant far over its rate is turned away here, not by the services.
--
-- The services count every call of a tenant in Redis (GCRA) and refuse one over the rate
-- with RESOURCE_EXHAUSTED, ErrorInfo RATE_LIMITED (`limit` rpm_read or rpm_write) and the
-- exact wait until the next call would be admitted (RetryInfo, retry-after-ms). No call of
-- that tenant and class can be admitted before then, so until then this filter answers
-- them itself, with the service's ErrorInfo and the wait that REMAINS: under a flood the
-- service sees about one call per wait (per Envoy worker) instead of every call.
--
-- 1. Only a tenant's own users fill the box or are held by it: the call's verified token
--    (jwt_authn's payload) names the tenant of the host (x-tenant-id, set by edge.lua). A
--    token of tenant b on tenant a's host is refused by the services and counted against b;
--    it never boxes a. Public calls carry no token and pass untouched.
-- 2. Only RATE_LIMITED fills it, for the limit its method counts (BOX.limits, from the
--    services' proto policies), and for at most BOX.max_wait_ms: the wait is exact, so the
--    only slack is a plan raised within it.
-- 3. The box is per Envoy worker (Lua state), bounded to BOX.max_entries live entries.
--
-- BOX is defined above this text by gateway/config.py.

local REFUSED = tostring(BOX.code)
local box = {} -- "<tenant> <limit>" -> {until_ms, message, info}
local entries = 0

local function sweep(now)
  for key, entry in pairs(box) do
    if entry.until_ms <= now then
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

-- The service's RATE_LIMITED details: Status.message, the ErrorInfo (as its Any) and its
-- limit; nil for any other status.
local function rate_limited(status)
  local message, info, limit = "", nil, nil
  local parsed = each_field(status, function(number, value)
    if number == 2 then
      message = value
    elseif number == 3 then
      local type_url, packed = first_two(value)
      if type_url ~= BOX.error_info_type or packed == nil then
        return
      end
      local reason, found = nil, nil
      each_field(packed, function(n, v)
        if n == 1 then
          reason = v
        elseif n == 3 then
          local key, val = first_two(v)
          if key == BOX.limit_key then
            found = val
          end
        end
      end)
      if reason == BOX.reason then
        info, limit = value, found
      end
    end
  end)
  if not parsed or info == nil then
    return nil
  end
  return message, info, limit
end

local function grpc_message(text)
  return (text:gsub("[^ -$&-~]", function(c)
    return string.format("%%%02X", c:byte())
  end))
end

local function refuse(handle, entry, wait_ms)
  local seconds = math.floor(wait_ms / 1000)
  local duration = varint_field(1, seconds) .. varint_field(2, (wait_ms - seconds * 1000) * 1000000)
  local retry = bytes_field(1, BOX.retry_info_type) .. bytes_field(2, bytes_field(1, duration))
  local message = entry.message:gsub("retry in [%d.]+s", string.format("retry in %.3fs", wait_ms / 1000))
  local status = varint_field(1, BOX.code) .. bytes_field(2, message) .. bytes_field(3, entry.info) .. bytes_field(3, retry)
  handle:respond({
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = REFUSED,
    ["grpc-message"] = grpc_message(message),
    ["grpc-status-details-bin"] = (handle:base64Escape(status):gsub("=+$", "")),
    [BOX.retry_header] = tostring(wait_ms),
  }, "")
end

-- The tenant this call's verified token belongs to, or nil.
local function token_tenant(handle)
  local jwt = handle:streamInfo():dynamicMetadata():get(BOX.jwt_namespace)
  local payload = jwt and jwt[BOX.jwt_payload_key]
  return payload and payload[BOX.tenant_claim]
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local tenant = headers:get("x-tenant-id")
  local limit = BOX.limits[headers:get(":path") or ""]
  if tenant == nil or limit == nil or token_tenant(handle) ~= tenant then
    return
  end
  local key = tenant .. " " .. limit
  local entry = box[key]
  local now = handle:timestamp()
  if entry ~= nil then
    local wait_ms = entry.until_ms - now
    if wait_ms > 0 then
      refuse(handle, entry, wait_ms)
      return
    end
    box[key] = nil
    entries = entries - 1
  end
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set(BOX.namespace, "key", key)
  metadata:set(BOX.namespace, "limit", limit)
  metadata:set(BOX.namespace, "sent_ms", now)
end

function envoy_on_response(handle)
  local headers = handle:headers()
  -- A refusal is a Trailers-Only reply: its status is in the headers.
  if headers:get("grpc-status") ~= REFUSED then
    return
  end
  local call = handle:streamInfo():dynamicMetadata():get(BOX.namespace)
  local wait_ms = tonumber(headers:get(BOX.retry_header) or "")
  local details = headers:get("grpc-status-details-bin")
  if call == nil or wait_ms == nil or wait_ms < 1 or details == nil then
    return
  end
  local message, info, limit = rate_limited(handle:base64Decode(details))
  if message == nil or limit ~= call["limit"] then
    return
  end
  if box[call["key"]] == nil then
    if entries >= BOX.max_entries then
      sweep(handle:timestamp())
      if entries >= BOX.max_entries then
        return
      end
    end
    entries = entries + 1
  end
  -- The wait counts from when the call left here, before the service asked Redis: never later
  -- than the moment Redis admits the next call.
  local until_ms = call["sent_ms"] + math.min(math.floor(wait_ms), BOX.max_wait_ms)
  box[call["key"]] = { until_ms = until_ms, message = message, info = info }
end
