{{/*
RBAC rules of the operator, one comment per rule saying which call needs it. Two sets: the
namespaced resources it reconciles and writes (a ClusterRole, or a Role per watched namespace),
and the cluster-scoped ones it only reads (always a ClusterRole).
*/}}

{{- define "iam-key-operator.namespacedRules" -}}
# Watch IamAccessKeys (list/watch), read each fresh before acting (get), and add/remove the
# iam.keyop.dev/cleanup finalizer (patch). The operator never writes the spec.
- apiGroups: ["iam.keyop.dev"]
  resources: ["iamaccesskeys"]
  verbs: ["get", "list", "watch", "patch"]
# Write status (server-side apply, field manager iam-key-operator).
- apiGroups: ["iam.keyop.dev"]
  resources: ["iamaccesskeys/status"]
  verbs: ["patch"]
# The Secret's owner reference sets blockOwnerDeletion, which the OwnerReferencesPermissionEnforcement
# admission plugin allows only to those who may update the owner's finalizers.
- apiGroups: ["iam.keyop.dev"]
  resources: ["iamaccesskeys/finalizers"]
  verbs: ["update"]
# The Secrets holding the keys: read their metadata (get), watch only the operator's own
# (list/watch with the label selector app.kubernetes.io/managed-by=iam-key-operator, metadata
# only), create a missing one, replace one of its own whole on rotation or a layout change
# (update, conditional on its resourceVersion), delete it in cleanup.
# RBAC cannot scope a rule by label, so this grant covers every Secret in scope: the label
# selector and metadata-only watch are what keep other Secrets out of the operator's memory.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
# Events on IamAccessKeys (each created once; the operator never updates a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
# spec.restartTargets: read a workload and roll it out (patch its Pod template's annotation).
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "patch"]
{{- end -}}

{{- define "iam-key-operator.clusterRules" -}}
# IamAccessKeyPolicies (cluster-scoped) decide which namespace may manage which IAM user.
- apiGroups: ["iam.keyop.dev"]
  resources: ["iamaccesskeypolicies"]
  verbs: ["get", "list", "watch"]
# Write each policy's status: Ready, and GrantsOverlap naming namespaces whose grants collide
# (server-side apply, field manager iam-key-operator). Never the spec.
- apiGroups: ["iam.keyop.dev"]
  resources: ["iamaccesskeypolicies/status"]
  verbs: ["patch"]
# Namespace labels, for the policies' namespaceSelector.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end -}}

{{- define "iam-key-operator.metricsAuthRules" -}}
# metrics.auth: /metrics asks the API server who a scraper's bearer token belongs to
# (tokenreviews) and whether that user may get the non-resource URL /metrics (subjectaccessreviews).
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
- apiGroups: ["authorization.k8s.io"]
  resources: ["subjectaccessreviews"]
  verbs: ["create"]
{{- end -}}
