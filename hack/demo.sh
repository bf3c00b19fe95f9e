#!/usr/bin/env bash
# `make demo`: the operator reconciling an example against a local API server and IAM endpoint.
# Leaves everything running so you can play with it; `make dev-down` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=${DEV_DIR:-$PWD/.dev}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building the operator and starting a local kube-apiserver + etcd + moto (IAM) (make dev-up)"
cargo build --quiet --locked
make --no-print-directory dev-up
# shellcheck disable=SC1091
source "$dev/env"   # KUBECONFIG, AWS_ENDPOINT_URL_IAM/STS, dummy credentials, PATH with kubectl

step "Creating the IAM user billing-uploader in the IAM endpoint ($AWS_ENDPOINT_URL_IAM)"
"$(dirname "$(hack/moto.sh --path)")/python" - <<'PY'
import boto3
iam = boto3.client("iam", region_name="us-east-1")
try:
    iam.create_user(UserName="billing-uploader")
except iam.exceptions.EntityAlreadyExistsException:
    pass
print("user:", iam.get_user(UserName="billing-uploader")["User"]["Arn"])
PY

step "Starting the operator (log: $dev/operator.log, metrics: http://127.0.0.1:18080/metrics)"
if [ -f "$dev/operator.pid" ] && kill "$(cat "$dev/operator.pid")" 2>/dev/null; then
  while kill -0 "$(cat "$dev/operator.pid")" 2>/dev/null; do sleep 0.2; done
fi
nohup target/debug/iam-key-operator run --cluster-name demo --metrics-addr 127.0.0.1:18080 \
  >"$dev/operator.log" 2>&1 &
echo $! >"$dev/operator.pid"

step "kubectl apply -n demo -f deploy/examples/iamaccesskey.yaml"
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n demo -f deploy/examples/iamaccesskey.yaml
kubectl wait -n demo --for=condition=Ready iak/uploader --timeout=120s

step "kubectl get iak -n demo"
kubectl get iak -n demo

step "The Secret's keys (values redacted)"
kubectl get secret uploader-aws -n demo \
  -o go-template='{{range $k, $v := .data}}{{$k}}: <redacted>{{"\n"}}{{end}}'
kubectl get secret uploader-aws -n demo -o jsonpath='{.metadata.annotations}{"\n"}'

step "Events"
kubectl get events -n demo

step "A few metrics"
curl -fsS http://127.0.0.1:18080/metrics | grep -E '^iam_key_operator_(iam_calls|reconciles)_total' | head -12

cat <<TXT

Try it yourself:
  source $dev/env
  kubectl annotate -n demo iak/uploader iam.keyop.dev/rotate-requested-at=\$(date -u +%FT%TZ) --overwrite   # rotate now
  kubectl get iak -n demo -w                       # watch the key ID change
  kubectl patch -n demo iak/uploader --type merge -p '{"spec":{"keyStatus":"Inactive"}}'
  kubectl delete -n demo iak/uploader              # deletes the IAM key and the Secret
Stop everything:  make dev-down
TXT
