-- Actions Argo CD offers on an IamAccessKey (iam-key-operator). Lua 5.1 (gopher-lua) with Argo
-- CD's libraries: base, table and a safe os only (no string or math).
--   rotate  ask for a new key now (sets iam.keyop.dev/rotate-requested-at, like
--           `iam-key-operator rotate`). Disabled while there is no key yet, while a key is being
--           created or a rotation is still in its overlap, while the resource is being deleted,
--           and while it is paused (a pause no policy allows is ignored by the operator, which
--           says so with the condition PolicyOverride, reason PauseNotAllowed: rotate stays).
--   pause   stop every IAM and Secret write for this resource, its deletion included (sets
--           iam.keyop.dev/paused: "true"). Disabled while paused.
--   resume  remove that annotation. Enabled only while paused.
local actions = {}

local annotations = obj.metadata.annotations or {}
local paused = annotations["iam.keyop.dev/paused"] == "true"
local status = obj.status or {}
local pauseIgnored = false
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "PolicyOverride" and condition.reason == "PauseNotAllowed" then
      pauseIgnored = true
    end
  end
end
local busy = (paused and not pauseIgnored) or status.accessKeyId == nil or status.pendingCreate ~= nil or obj.metadata.deletionTimestamp ~= nil
if status.keys ~= nil then
  for _, key in ipairs(status.keys) do
    if key.phase == "Draining" then
      busy = true
    end
  end
end

actions["rotate"] = {
  ["disabled"] = busy,
  ["iconClass"] = "fa fa-fw fa-key",
  ["displayName"] = "Rotate access key",
}
actions["pause"] = {
  ["disabled"] = paused,
  ["iconClass"] = "fa fa-fw fa-pause",
  ["displayName"] = "Pause (no IAM or Secret changes)",
}
actions["resume"] = {
  ["disabled"] = not paused,
  ["iconClass"] = "fa fa-fw fa-play",
  ["displayName"] = "Resume",
}
return actions
