-- Argo CD health of an IamAccessKeyPolicy (iam-key-operator). Lua 5.1 (gopher-lua) with Argo
-- CD's libraries: base, table and a safe os only (no string or math). Reads only metadata and
-- status.
--   Healthy      Ready=True: every rule works as written; the message counts the namespaces the
--                rules allow. With GrantsOverlap=True (two namespaces could manage the same IAM
--                user) still Healthy, with the overlap as the message: the rules apply as written
--                and the operator reports the overlap as a warning (argocd/README.md says why)
--   Progressing  the operator has not checked the policy, or not this generation of it, yet
--   Degraded     Ready=False: a rule cannot work as written (InvalidRule; the other rules still
--                apply) or the stored policy cannot be read (Unreadable; it allows nothing)
local hs = {}

local function findCondition(status, conditionType)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == conditionType then
      return condition
    end
  end
  return nil
end

local function withDefault(message, default)
  if message == nil or message == "" then
    return default
  end
  return message
end

local metadata = obj.metadata or {}
local status = obj.status
local ready = findCondition(status, "Ready")

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for iam-key-operator to check the policy's rules"
  return hs
end

local observed = status.observedGeneration
if observed == nil then
  observed = ready.observedGeneration
end
if metadata.generation ~= nil and observed ~= nil and observed < metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for iam-key-operator to check generation " .. tostring(metadata.generation)
  return hs
end

if ready.status == "False" then
  hs.status = "Degraded"
  hs.message = tostring(ready.reason) .. ": " .. withDefault(ready.message, "Ready is False")
  return hs
end

if ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = withDefault(ready.message, "Waiting for iam-key-operator to check the policy's rules")
  return hs
end

local overlap = findCondition(status, "GrantsOverlap")
if overlap ~= nil and overlap.status == "True" then
  hs.status = "Healthy"
  hs.message = tostring(overlap.reason) .. " (warning): " .. withDefault(overlap.message, "two namespaces could manage the same IAM user")
  return hs
end

hs.status = "Healthy"
hs.message = withDefault(ready.message, "")
return hs
