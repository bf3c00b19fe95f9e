-- Ask iam-key-operator for a new access key now: the same annotation `iam-key-operator rotate`
-- sets. The operator rotates whenever the value differs from the one it last acted on, with the
-- usual overlap (the previous key stays Active for spec.rotation.gracePeriod). Lua 5.1
-- (gopher-lua); Argo CD provides os.date.
local os = require("os")
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["iam.keyop.dev/rotate-requested-at"] = os.date("!%Y-%m-%dT%XZ")
return obj
