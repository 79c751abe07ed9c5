-- Edge identity, run by Envoy on every request after jwt_authn and before routing.
--
-- 1. Identity headers are the gateway's to set, never the client's: every header in
--    EDGE.identity_headers and every header starting with EDGE.internal_prefix is removed.
-- 2. The tenant comes from the Host: "<tenant>.<base domain>" (strict: the tenant id rule
--    of the services, EDGE.tenant_id) sets x-tenant-id; so does a tenant's custom domain,
--    whose routes name the tenant in their metadata (EDGE.tenant_key, gateway/domains.py).
--    Any other host names no tenant.
-- 3. Without a tenant only public RPCs, the web page and CORS preflights pass; any other
--    API call is refused with PERMISSION_DENIED and ErrorInfo TENANT_SUBDOMAIN_REQUIRED.
--
-- EDGE is defined above this text by gateway/config.py, from the gateway settings, the
-- services' proto policies and their tenant id rule (TENANT_ID in services/runtime/ids.py).

local function tenant_from_host(authority)
  if authority == nil then
    return nil
  end
  local host = string.lower(authority)
  host = host:match("^(.-):%d+$") or host
  local suffix = "." .. EDGE.base_domain
  if #host <= #suffix or host:sub(-#suffix) ~= suffix then
    return nil
  end
  local label = host:sub(1, #host - #suffix)
  local rule = EDGE.tenant_id
  if #label < rule.min_length or #label > rule.max_length or label:match(rule.pattern) == nil then
    return nil
  end
  return label
end

local function strip_identity(headers)
  for _, name in ipairs(EDGE.identity_headers) do
    headers:remove(name)
  end
  local internal = {}
  for name, _ in pairs(headers) do
    if name:sub(1, #EDGE.internal_prefix) == EDGE.internal_prefix then
      internal[#internal + 1] = name
    end
  end
  for _, name in ipairs(internal) do
    headers:remove(name)
  end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  strip_identity(headers)
  -- A custom domain's tenant only when the host is no subdomain: subdomain calls read no metadata.
  local tenant = tenant_from_host(headers:get(":authority")) or handle:metadata():get(EDGE.tenant_key)
  if tenant ~= nil then
    headers:add("x-tenant-id", tenant)
    return
  end
  local path = headers:get(":path") or ""
  if EDGE.public_paths[path] or path:sub(1, #EDGE.api_prefix) ~= EDGE.api_prefix then
    return
  end
  if headers:get(":method") == "OPTIONS" then
    return
  end
  handle:respond({
    [":status"] = "200",
    ["content-type"] = "application/grpc",
    ["grpc-status"] = "7",
    ["grpc-message"] = EDGE.no_tenant_message,
    ["grpc-status-details-bin"] = EDGE.no_tenant_details,
  }, "")
end
