-- Edge identity: the first step of the edge filter (gateway/config.py), on every request
-- after jwt_authn and before the penalty box and routing.
--
-- 1. Identity headers are the gateway's to set, never the client's: a client's copy of every
--    header in IDENTITY_HEADERS and of every x-towerco-* header is removed before any filter
--    runs (Envoy's early header mutation, gateway/config.py); here the marks the gateway set
--    itself for the filters before this one (EDGE.gateway_marks) are removed.
-- 2. The tenant comes from the Host: "<tenant>.<base domain>" (strict: the tenant id rule
--    of the services, EDGE.tenant_id) sets x-tenant-id; so does a tenant's custom domain,
--    whose routes name the tenant in their metadata (EDGE.tenant_key, gateway/domains.py).
--    Any other host names no tenant.
-- 3. Without a tenant only public RPCs, the web page and CORS preflights pass; any other
--    API call is refused with PERMISSION_DENIED and ErrorInfo TENANT_SUBDOMAIN_REQUIRED.
--
-- EDGE is defined above this text by gateway/config.py, from the gateway settings, the
-- services' proto policies and their tenant id rule (TENANT_ID in services/runtime/ids.py).

local function tenant_of(authority)
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

-- A worker sees few hosts, so each one's answer is kept (false: no tenant), up to
-- EDGE.hosts_cached of them, each no longer than a DNS name and a port; when full it starts over.
local HOST_MOST = 253 + 6
local hosts = {}
local cached = 0

local function tenant_from_host(authority)
  if authority == nil then
    return nil
  end
  local tenant = hosts[authority]
  if tenant == nil then
    tenant = tenant_of(authority) or false
    if #authority <= HOST_MOST then
      if cached >= EDGE.hosts_cached then
        hosts, cached = {}, 0
      end
      hosts[authority] = tenant
      cached = cached + 1
    end
  end
  return tenant or nil
end

local function on_request(handle, headers)
  for _, name in ipairs(EDGE.gateway_marks) do
    headers:remove(name)
  end
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
  return true
end

return { on_request = on_request }
