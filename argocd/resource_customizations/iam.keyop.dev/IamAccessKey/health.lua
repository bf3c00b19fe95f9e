-- Argo CD health of an IamAccessKey (iam-key-operator). Lua 5.1 (gopher-lua) with Argo CD's
-- libraries: base, table and a safe os only (no string or math). Reads only metadata and status.
--   Healthy      Ready=True and nothing in flight
--   Progressing  not reconciled yet, spec change not yet acted on, a key being created, a rotation
--                in its overlap (a Draining key), deletion in progress, or a retryable error
--   Degraded     Ready=False for a reason that needs a person (the condition's message says what)
--   Suspended    paused with the annotation iam.keyop.dev/paused: "true" (unless the operator
--                reports that no policy allows the pause: condition PolicyOverride,
--                reason PauseNotAllowed; then it is reconciled and judged as usual)
local hs = {}

-- Ready=False reasons the operator retries by itself (with backoff): Progressing. Every other
-- reason (UserNotFound, UserClaimed, SecretConflict, SecretNotFound, KeyLimitExceeded, NotAuthorized,
-- PolicyViolation, AccountConflict, AccountChanged, AssumeRoleFailed, AdoptionRefused,
-- MergeNotAllowed, InvalidSpec, InvalidTemplate, DeactivatedUnused, IamNotFound, IamRejected,
-- InternalError (a bug to report), and any reason this script does not know yet) needs someone
-- to change IAM, a Secret, the spec, a policy or the operator: Degraded, with the condition's
-- message.
local retryable = {
  Throttled = true,
  IamUnavailable = true,
  IamBusy = true,
  KubernetesError = true,
  KeyVerificationFailed = true,
  FinalizerError = true,
}

local function findCondition(status, type)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == type then
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
local annotations = metadata.annotations or {}
local status = obj.status
local ready = findCondition(status, "Ready")
local override = findCondition(status, "PolicyOverride")
local pauseIgnored = override ~= nil and override.reason == "PauseNotAllowed"

if (annotations["iam.keyop.dev/paused"] == "true" and not pauseIgnored) or (ready ~= nil and ready.reason == "Paused") then
  hs.status = "Suspended"
  hs.message = "Paused by the annotation iam.keyop.dev/paused: no IAM or Secret changes until it is removed"
  return hs
end

if metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Deleting: waiting for iam-key-operator to remove the access keys (finalizer iam.keyop.dev/cleanup)"
  if ready ~= nil and ready.status == "False" then
    hs.message = hs.message .. ": " .. withDefault(ready.message, ready.reason)
  end
  return hs
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for iam-key-operator to create the access key"
  return hs
end

if metadata.generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for iam-key-operator to act on generation " .. tostring(metadata.generation)
  return hs
end

if ready.status == "False" then
  local message = withDefault(ready.message, "Ready is False")
  if retryable[ready.reason] then
    hs.status = "Progressing"
    hs.message = ready.reason .. " (retrying): " .. message
  else
    hs.status = "Degraded"
    hs.message = ready.reason .. ": " .. message
  end
  return hs
end

if ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = withDefault(ready.message, "Waiting for iam-key-operator")
  return hs
end

if status.pendingCreate ~= nil then
  hs.status = "Progressing"
  hs.message = "Creating and verifying a new access key"
  return hs
end

if status.keys ~= nil then
  for _, key in ipairs(status.keys) do
    if key.phase == "Draining" then
      hs.status = "Progressing"
      hs.message = "Rotating: the new key " .. tostring(status.accessKeyId) .. " is in the Secret; the previous key " ..
        tostring(key.accessKeyId) .. " stays Active"
      if key.deactivateAt ~= nil then
        hs.message = hs.message .. " until " .. key.deactivateAt
      else
        hs.message = hs.message .. " until it is no longer used"
      end
      return hs
    end
  end
end

hs.status = "Healthy"
hs.message = withDefault(ready.message, "")
return hs
