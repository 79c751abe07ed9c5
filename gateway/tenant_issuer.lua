-- Tenant issuers (single sign-on): a step of the intake filter (gateway/config.py), before
-- jwt_authn, on every request.
--
-- jwt_authn knows the platform's issuer only (its providers are static). A tenant that
-- signs in with its own identity provider (SsoConfigService) has tokens of another `iss`,
-- added or changed at any time without a gateway restart. So this filter reads the bearer
-- token's `iss` WITHOUT verifying anything and, when it is not the platform's, sets
-- ISSUERS.header; jwt_authn's rule for requests carrying that header requires no token,
-- and the services verify the token fully (the tenant's keys, its audience, its tenant
-- from the issuer, never a claim). A client's own copy of the header never gets this far
-- (the early header mutation removes every x-towerco-* header a client sends), and edge.lua
-- removes the gateway's before the call goes on.
--
-- The answer depends on the token alone, so each Envoy worker keeps it per authorization
-- header: a client's every call after its first costs one table lookup, not a base64
-- decode in Lua. At most ISSUERS.cache_size tokens are kept; when full, the cache starts
-- over (a token is at most ISSUERS.max_token_bytes, so the cache stays bounded).
--
-- ISSUERS is defined above this text by gateway/config.py (the platform issuer, the header).

local ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local VALUES = {}
for i = 1, #ALPHABET do
  VALUES[ALPHABET:sub(i, i)] = i - 1
end

-- Base64url without padding to bytes; nil if a character is not of the alphabet.
local function base64url_decode(text)
  local out, bits, count = {}, 0, 0
  for i = 1, #text do
    local value = VALUES[text:sub(i, i)]
    if value == nil then
      return nil
    end
    bits = bits * 64 + value
    count = count + 6
    if count >= 8 then
      count = count - 8
      local byte = math.floor(bits / 2 ^ count) % 256
      out[#out + 1] = string.char(byte)
      bits = bits % 2 ^ count
    end
  end
  return table.concat(out)
end

-- The `iss` a token names, unverified; nil if there is none to read.
local function unverified_issuer(authorization)
  if authorization == nil or #authorization > ISSUERS.max_token_bytes then
    return nil
  end
  local token = authorization:match("^[Bb][Ee][Aa][Rr][Ee][Rr] +([%w%-_]+%.[%w%-_]+%.[%w%-_]*)$")
  if token == nil then
    return nil
  end
  local payload = base64url_decode(token:match("^[^.]+%.([^.]+)%."))
  if payload == nil then
    return nil
  end
  return payload:match('"iss"%s*:%s*"([^"\\]*)"')
end

-- Whether a token names a tenant's issuer: a URL (OIDC); the platform's service issuer, a
-- plain name, never passes.
local function tenant_issuer(authorization)
  local issuer = unverified_issuer(authorization)
  return issuer ~= nil and issuer ~= ISSUERS.platform_issuer and issuer:match("^https?://") ~= nil
end

local decided = {} -- authorization header -> tenant_issuer(it)
local cached = 0

local function on_request(_, headers)
  local authorization = headers:get("authorization")
  if authorization == nil then
    return
  end
  local marked = decided[authorization]
  if marked == nil then
    marked = tenant_issuer(authorization)
    if cached >= ISSUERS.cache_size then
      decided, cached = {}, 0
    end
    decided[authorization] = marked
    cached = cached + 1
  end
  if marked then
    headers:add(ISSUERS.header, "1")
  end
end

return { on_request = on_request }
