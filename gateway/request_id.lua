-- Request ids: the first step of the intake filter (gateway/config.py), on every request.
--
-- Envoy gives every request its own x-request-id; the client's was set aside before that
-- (as REQUEST_IDS.client_header, by the early header mutation in gateway/config.py). It
-- is kept when it follows the services' rule (REQUEST_ID in services/runtime/ids.py): at
-- most REQUEST_IDS.max_length characters matching REQUEST_IDS.pattern. Otherwise Envoy's stays. Either way the service logs and
-- audits that id and the client reads it back in x-request-id, on errors too.
--
-- REQUEST_IDS is defined above this text by gateway/config.py, from the services' rule.

local function on_request(_, headers)
  local supplied = headers:get(REQUEST_IDS.client_header)
  if supplied == nil then
    return
  end
  headers:remove(REQUEST_IDS.client_header)
  if #supplied <= REQUEST_IDS.max_length and supplied:find(REQUEST_IDS.pattern) then
    headers:replace("x-request-id", supplied)
  end
end

return { on_request = on_request }
