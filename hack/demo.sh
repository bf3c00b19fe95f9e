#!/usr/bin/env bash
# `make demo`: install the operator's chart into a local API server, run the operator with the
# identity the chart installed, and reconcile an example against a local IAM endpoint.
# Leaves everything running so you can play with it; `make dev-down` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=${DEV_DIR:-$PWD/.dev}
ns=iam-key-operator
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building the operator; starting kube-apiserver + etcd + kube-controller-manager + moto (IAM) (make dev-up)"
cargo build --quiet --locked
make --no-print-directory dev-up
# shellcheck disable=SC1091
source "$dev/env"   # KUBECONFIG, AWS_ENDPOINT_URL_IAM/STS, dummy credentials, PATH with kubectl and helm

step "helm install iam-key-operator charts/iam-key-operator -n $ns (the CRDs are installed already by dev-up: crds.enabled=false)"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
helm upgrade --install iam-key-operator charts/iam-key-operator -n "$ns" --set crds.enabled=false \
  --set clusterName=demo >/dev/null
kubectl get deployment,serviceaccount,clusterrole,lease -n "$ns" -l app.kubernetes.io/instance=iam-key-operator 2>/dev/null \
  || kubectl get deployment,serviceaccount -n "$ns"

step "Running the operator outside the cluster with the installed ServiceAccount's token (no kubelet here)"
server=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
token=$(kubectl create token iam-key-operator -n "$ns" --duration=24h)
cat >"$dev/operator.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: demo, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: operator, user: {token: "$token"}}]
contexts: [{name: demo, context: {cluster: demo, user: operator}}]
current-context: demo
KUBECONFIG

step "The operator's AWS identity: an IAM user holding deploy/iam-policy.json (the IAM endpoint checks signatures and policies)"
# moto matches IAM actions against the resource "*" only and cannot evaluate conditions, so the
# shipped policy's Resource is widened and its Condition dropped here; its actions are exact.
"$(dirname "$(hack/moto.sh --path)")/python" - "$dev/operator-aws.env" <<'PY'
import boto3, json, sys
iam = boto3.client("iam", region_name="us-east-1")
policy = json.load(open("deploy/iam-policy.json"))
for statement in policy["Statement"]:
    statement["Resource"] = "*"
    statement.pop("Condition", None)
try:
    iam.create_user(UserName="iam-key-operator")
except iam.exceptions.EntityAlreadyExistsException:
    for old in iam.list_access_keys(UserName="iam-key-operator")["AccessKeyMetadata"]:
        iam.delete_access_key(UserName="iam-key-operator", AccessKeyId=old["AccessKeyId"])
iam.put_user_policy(UserName="iam-key-operator", PolicyName="iam-key-operator", PolicyDocument=json.dumps(policy))
key = iam.create_access_key(UserName="iam-key-operator")["AccessKey"]
with open(sys.argv[1], "w") as out:
    out.write(f"AWS_ACCESS_KEY_ID={key['AccessKeyId']}\nAWS_SECRET_ACCESS_KEY={key['SecretAccessKey']}\n")
print("operator identity:", iam.get_user(UserName="iam-key-operator")["User"]["Arn"])
try:
    iam.create_user(UserName="billing-uploader", Path="/k8s/team-billing/")
except iam.exceptions.EntityAlreadyExistsException:
    pass
print("managed user:", iam.get_user(UserName="billing-uploader")["User"]["Arn"])
PY
chmod 600 "$dev/operator-aws.env"

if [ -f "$dev/operator.pid" ] && kill "$(cat "$dev/operator.pid")" 2>/dev/null; then
  while kill -0 "$(cat "$dev/operator.pid")" 2>/dev/null; do sleep 0.2; done
fi
(
  set -a; source "$dev/operator-aws.env"; set +a
  KUBECONFIG="$dev/operator.kubeconfig" POD_NAMESPACE="$ns" POD_NAME=demo-0 exec nohup target/debug/iam-key-operator run \
    --cluster-name demo --leader-elect --lease-name iam-key-operator --metrics-addr 127.0.0.1:18080 \
    >"$dev/operator.log" 2>&1
) &
echo $! >"$dev/operator.pid"
echo "log: $dev/operator.log    metrics: http://127.0.0.1:18080/metrics"

step "kubectl apply -f deploy/examples/policy.yaml   (team-* namespaces may manage users under /k8s/<namespace>/)"
kubectl apply -f deploy/examples/policy.yaml

step "kubectl apply -n team-billing -f deploy/examples/iamaccesskey.yaml"
kubectl create namespace team-billing --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n team-billing -f deploy/examples/iamaccesskey.yaml
kubectl wait -n team-billing --for=condition=Ready iak/uploader --timeout=120s

step "kubectl get iak -n team-billing"
kubectl get iak -n team-billing

step "The Secret's keys (values redacted)"
kubectl get secret uploader-aws -n team-billing \
  -o go-template='{{range $k, $v := .data}}{{$k}}: <redacted>{{"\n"}}{{end}}'
kubectl get secret uploader-aws -n team-billing -o jsonpath='{.metadata.annotations}{"\n"}'

step "Rotate: iam-key-operator rotate -n team-billing uploader"
first=$(kubectl get iak -n team-billing uploader -o jsonpath='{.status.accessKeyId}')
target/debug/iam-key-operator rotate -n team-billing uploader
for _ in $(seq 1 120); do
  current=$(kubectl get iak -n team-billing uploader -o jsonpath='{.status.accessKeyId}')
  [ -n "$current" ] && [ "$current" != "$first" ] && break
  sleep 0.5
done
if [ "$current" = "$first" ]; then
  echo "the rotation did not complete in 60 s; see $dev/operator.log" >&2
  exit 1
fi
kubectl wait -n team-billing --for=condition=Ready iak/uploader --timeout=60s >/dev/null
echo "rotated: $first -> $current (the Secret holds $(kubectl get secret uploader-aws -n team-billing \
  -o jsonpath='{.metadata.annotations.iam\.keyop\.dev/access-key-id}'); the old key drains, then is retired)"
kubectl get iak -n team-billing uploader -o jsonpath='{range .status.keys[*]}  {.accessKeyId}  {.phase}{"\n"}{end}'

step "Events"
kubectl get events -n team-billing

step "A few metrics"
curl -fsS http://127.0.0.1:18080/metrics | grep -E '^iam_key_operator_(iam_calls|reconciles|rotations)_total' | sed -n 1,12p

cat <<TXT

Try it yourself:
  source $dev/env
  target/debug/iam-key-operator rotate -n team-billing uploader   # rotate now (sets the annotation)
  kubectl get iak -n team-billing -w                                # watch the key ID change
  kubectl get iak -n team-billing uploader -o jsonpath='{.status.keys}'   # Current / Draining / Inactive
  kubectl patch -n team-billing iak/uploader --type merge -p '{"spec":{"keyStatus":"Inactive"}}'
  kubectl delete -n team-billing iak/uploader                       # deletes the IAM key and the Secret
Stop everything:  make dev-down
TXT
