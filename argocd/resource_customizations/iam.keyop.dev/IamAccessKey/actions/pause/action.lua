-- Pause iam-key-operator for this IamAccessKey: the same as
-- `kubectl annotate iak NAME iam.keyop.dev/paused=true`. The operator then makes no IAM or Secret
-- write for it, its deletion included (the finalizer waits), and reports Ready=False, reason
-- Paused; Argo CD shows it Suspended. Lua 5.1 (gopher-lua).
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["iam.keyop.dev/paused"] = "true"
return obj
