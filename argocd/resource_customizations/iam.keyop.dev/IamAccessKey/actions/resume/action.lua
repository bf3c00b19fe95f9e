-- Resume iam-key-operator for this IamAccessKey: removes the annotation iam.keyop.dev/paused, the
-- same as `kubectl annotate iak NAME iam.keyop.dev/paused-`. The operator carries on from where
-- it stopped (a rotation or a deletion that came due meanwhile included). Lua 5.1 (gopher-lua).
if obj.metadata.annotations ~= nil then
  obj.metadata.annotations["iam.keyop.dev/paused"] = nil
end
return obj
