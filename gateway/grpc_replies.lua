-- gRPC answers for the errors Envoy makes itself, on every API call: a step of the intake
-- filter (gateway/config.py), whose response side runs before grpc_web encodes the answer.
--
-- Envoy's own refusals (jwt_authn, a route timeout, a service that cannot be reached)
-- leave as plain HTTP errors with a text body. A gRPC or gRPC-web client reads a status
-- only from grpc-status under HTTP 200 (the Trailers-Only form); otherwise it guesses
-- one from the HTTP status and loses the message. So such a reply becomes HTTP 200 with
-- grpc-status, grpc-message (Envoy's text) and grpc-status-details-bin (an ErrorInfo
-- reason, and RetryInfo where a retry can help), exactly as a service would answer.
--
-- A native gRPC call's error is already written by Envoy as a gRPC status, with Envoy's
-- raw text ("upstream connect error ...") and no details; such replies carry
-- REPLIES.local_reply_header (the HTTP status Envoy chose, set by the local reply config),
-- so they get the same answer as a gRPC-web call, whatever form Envoy gave them.
--
-- A route timeout is the gateway's deadline: DEADLINE_EXCEEDED, as a gRPC server says,
-- not UNAVAILABLE, which clients may retry blindly.
--
-- REPLIES is defined above this text by gateway/config.py: for each reason, its gRPC
-- status, message and the serialized google.rpc.Status details.

local function reason_for(http_status, text)
  if http_status == "401" then
    if text:find("missing", 1, true) then
      return "TOKEN_MISSING"
    elseif text:find("expired", 1, true) then
      return "TOKEN_EXPIRED"
    elseif text:find("not yet valid", 1, true) then
      return "TOKEN_NOT_YET_VALID"
    end
    return "TOKEN_INVALID"
  elseif http_status == "403" then
    return "REQUEST_DENIED"
  elseif http_status == "504" or http_status == "408" then
    return "GATEWAY_TIMEOUT"
  elseif http_status == "413" or http_status == "431" then
    return "REQUEST_TOO_LARGE"
  elseif http_status:sub(1, 1) == "4" then
    return "REQUEST_REFUSED"
  end
  return "SERVICE_UNAVAILABLE"
end

local function on_request(handle, headers)
  local path = headers:get(":path") or ""
  -- API calls only: not the page, not CORS preflights (answered by the cors filter).
  if headers:get(":method") == "POST" and path:sub(1, #REPLIES.api_prefix) == REPLIES.api_prefix then
    handle:streamInfo():dynamicMetadata():set("towerco.grpc_replies", "api", true)
  end
end

local function on_response(handle)
  local headers = handle:headers()
  local local_reply = headers:get(REPLIES.local_reply_header)
  local content_type = headers:get("content-type") or ""
  local grpc_answer = content_type:sub(1, 16) == "application/grpc" or headers:get("grpc-status") ~= nil
  if local_reply == nil and grpc_answer and headers:get(":status") == "200" then
    -- The usual answer (a service's, or one the gateway wrote with its details): nothing to
    -- change, whatever the call was; it does not read the call's metadata.
    return
  end
  if local_reply ~= nil then
    headers:remove(REPLIES.local_reply_header)
  end
  local metadata = handle:streamInfo():dynamicMetadata():get("towerco.grpc_replies")
  if metadata == nil or not metadata["api"] then
    return
  end
  if local_reply == nil and grpc_answer then
    -- A service's answer, or one the gateway wrote itself with its details.
    if headers:get(":status") ~= "200" then
      headers:replace(":status", "200")
    end
    return
  end
  local http_status = local_reply or headers:get(":status") or "503"
  local text = headers:get("grpc-message") or ""
  if not grpc_answer then
    local body = handle:body()
    if body ~= nil then
      text = body:getBytes(0, math.min(body:length(), 1024))
      body:setBytes("")
    end
  end
  local reply = REPLIES.reasons[reason_for(http_status, text)]
  headers = handle:headers() -- reading the body ends the scope of the first handle
  headers:replace(":status", "200")
  headers:replace("content-type", "application/grpc")
  headers:remove("content-length")
  headers:replace("grpc-status", reply.code)
  headers:replace("grpc-message", reply.message)
  headers:replace("grpc-status-details-bin", reply.details)
end

return { on_request = on_request, on_response = on_response }
