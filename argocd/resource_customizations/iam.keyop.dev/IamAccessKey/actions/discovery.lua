-- Actions Argo CD offers on an IamAccessKey (iam-key-operator). Lua 5.1 (gopher-lua).
--   rotate  ask for a new key now (sets iam.keyop.dev/rotate-requested-at, like
--           `iam-key-operator rotate`). Disabled while there is no key yet, while a key is being
--           created or a rotation is still in its overlap, and while the resource is being deleted.
local actions = {}

local status = obj.status or {}
local busy = status.accessKeyId == nil or status.pendingCreate ~= nil or obj.metadata.deletionTimestamp ~= nil
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
return actions
