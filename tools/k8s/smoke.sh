#!/usr/bin/env bash
# Smoke test of the binaries that build.sh made: a one-member etcd, a secure
# kube-apiserver on it, kube-controller-manager and kube-scheduler, all on
# 127.0.0.1 only; then kubectl talks to it. Everything it starts is stopped by
# PID and its temp dir removed on exit, pass or fail.
#
#   tools/k8s/smoke.sh            # exit 0 = all checks passed
#   KEEP=1 tools/k8s/smoke.sh     # keep the temp dir (certs, logs) for a look
#
# Ports: etcd 23790 (client) / 23791 (peer), kube-apiserver 64430,
# kube-controller-manager 64431, kube-scheduler 64432 (override with
# ETCD_PORT, ETCD_PEER_PORT, APISERVER_PORT, KCM_PORT, SCHED_PORT).
set -euo pipefail

BIN="${MESHLESS_K8S_BIN:-$HOME/.cache/meshless/k8s-v1.36.3/bin}"
ETCD_PORT="${ETCD_PORT:-23790}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-23791}"
APISERVER_PORT="${APISERVER_PORT:-64430}"
KCM_PORT="${KCM_PORT:-64431}"
SCHED_PORT="${SCHED_PORT:-64432}"
SERVICE_CIDR=198.19.0.0/16
SERVICE_IP=198.19.0.1 # first address of SERVICE_CIDR: the "kubernetes" Service

for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [[ -x "$BIN/$b" ]] || { echo "missing $BIN/$b: run tools/k8s/build.sh" >&2; exit 1; }
done

# tmpfs: etcd fsyncs its WAL on every write; on a busy shared disk that made
# each request take ~2 s and readiness take over a minute.
tmp_root="${SMOKE_TMP:-/dev/shm}"
[[ -d "$tmp_root" && -w "$tmp_root" ]] || tmp_root=/tmp
work="$(mktemp -d "$tmp_root/meshless-k8s-smoke.XXXXXX")"
pids=()
cleanup() {
  local rc=$? i pid
  # Stop in reverse start order (clients before etcd), each by its own PID.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc -ne 0 ]]; then
    for f in "$work"/*.log; do [[ -f "$f" ]] && { echo "== tail $f" >&2; tail -25 "$f" >&2; }; done
  fi
  if [[ -n "${KEEP:-}" ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
  exit $rc
}
trap cleanup EXIT

# wait_for URL SECONDS [curl args...]: until URL answers 200 "ok".
wait_for() {
  local url=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until [[ "$(curl -s --max-time 2 "$@" "$url" || true)" == ok ]]; do
    if (( SECONDS >= end )); then echo "timed out waiting for $url" >&2; return 1; fi
    sleep 0.5
  done
}

# --- PKI: a CA, the apiserver's serving cert, a service-account key pair ----
pki="$work/pki"; mkdir -p "$pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=meshless-smoke-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
cat > "$pki/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:${SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
  -CAcreateserial -days 2 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

# Static bearer tokens (token,user,uid,"groups"); system:masters = cluster-admin.
admin_token="$(openssl rand -hex 16)"
kcm_token="$(openssl rand -hex 16)"
sched_token="$(openssl rand -hex 16)"
cat > "$pki/tokens.csv" <<EOF
${admin_token},admin,admin,"system:masters"
${kcm_token},system:kube-controller-manager,kcm,""
${sched_token},system:kube-scheduler,sched,""
EOF
chmod 600 "$pki"/*.key "$pki/tokens.csv"

kubeconfig() { # file user token
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: smoke
  cluster:
    server: https://127.0.0.1:${APISERVER_PORT}
    certificate-authority: ${pki}/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: smoke
  context: {cluster: smoke, user: $2}
current-context: smoke
EOF
  chmod 600 "$1"
}
kubeconfig "$work/admin.kubeconfig" admin "$admin_token"
kubeconfig "$work/kcm.kubeconfig" system:kube-controller-manager "$kcm_token"
kubeconfig "$work/sched.kubeconfig" system:kube-scheduler "$sched_token"
k() { "$BIN/kubectl" --kubeconfig "$work/admin.kubeconfig" --request-timeout=10s "$@"; }

# --- etcd --------------------------------------------------------------------
"$BIN/etcd" --name smoke --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:${ETCD_PORT}" \
  --advertise-client-urls "http://127.0.0.1:${ETCD_PORT}" \
  --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-cluster "smoke=http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-cluster-state new \
  --unsafe-no-fsync \
  > "$work/etcd.log" 2>&1 &
pids+=($!)
end=$((SECONDS + 30))
until curl -s --max-time 2 "http://127.0.0.1:${ETCD_PORT}/health" | grep -q '"health":"true"'; do
  (( SECONDS < end )) || { echo "etcd did not become healthy" >&2; exit 1; }
  sleep 0.5
done
echo "etcd: healthy on 127.0.0.1:${ETCD_PORT}"

# --- kube-apiserver ------------------------------------------------------------
t0=$SECONDS
"$BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:${ETCD_PORT}" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
  --secure-port="${APISERVER_PORT}" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --token-auth-file="$pki/tokens.csv" \
  --authorization-mode=RBAC \
  --service-cluster-ip-range="${SERVICE_CIDR}" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --endpoint-reconciler-type=none \
  --cert-dir="$work/apiserver-certs" \
  > "$work/kube-apiserver.log" 2>&1 &
pids+=($!)
wait_for "https://127.0.0.1:${APISERVER_PORT}/readyz" 90 \
  --cacert "$pki/ca.crt" -H "Authorization: Bearer ${admin_token}"
echo "kube-apiserver: ready on 127.0.0.1:${APISERVER_PORT} after $((SECONDS - t0)) s"

# --- kube-controller-manager and kube-scheduler ------------------------------------
"$BIN/kube-controller-manager" \
  --kubeconfig="$work/kcm.kubeconfig" \
  --authentication-kubeconfig="$work/kcm.kubeconfig" \
  --authorization-kubeconfig="$work/kcm.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="${KCM_PORT}" \
  --cert-dir="$work/kcm-certs" \
  --leader-elect=false \
  --service-account-private-key-file="$pki/sa.key" \
  --root-ca-file="$pki/ca.crt" \
  --service-cluster-ip-range="${SERVICE_CIDR}" \
  --use-service-account-credentials=true \
  > "$work/kube-controller-manager.log" 2>&1 &
pids+=($!)
"$BIN/kube-scheduler" \
  --kubeconfig="$work/sched.kubeconfig" \
  --authentication-kubeconfig="$work/sched.kubeconfig" \
  --authorization-kubeconfig="$work/sched.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="${SCHED_PORT}" \
  --cert-dir="$work/sched-certs" \
  --leader-elect=false \
  > "$work/kube-scheduler.log" 2>&1 &
pids+=($!)
wait_for "https://127.0.0.1:${KCM_PORT}/healthz" 60 -k
echo "kube-controller-manager: healthy on 127.0.0.1:${KCM_PORT}"
wait_for "https://127.0.0.1:${SCHED_PORT}/healthz" 60 -k
echo "kube-scheduler: healthy on 127.0.0.1:${SCHED_PORT}"

# --- kubectl checks ------------------------------------------------------------------
echo "--- kubectl get --raw /readyz";       k get --raw /readyz; echo
echo "--- kubectl version";                 k version
echo "--- kubectl get ns";                  k get ns
k get ns kube-system >/dev/null
echo "--- configmap create/get"
k -n default create configmap meshless-smoke --from-literal=hello=world
[[ "$(k -n default get configmap meshless-smoke -o jsonpath='{.data.hello}')" == world ]]
k -n default get configmap meshless-smoke
echo "--- RBAC: a user with no bindings is refused"
kubeconfig "$work/nobody.kubeconfig" nobody "nope" # token not in tokens.csv
if "$BIN/kubectl" --kubeconfig "$work/nobody.kubeconfig" get ns >/dev/null 2>&1; then
  echo "unauthenticated request was allowed" >&2; exit 1
fi
[[ "$(k auth can-i list secrets --as=someone -A || true)" == no ]]

echo "--- controller-manager: the default ServiceAccount appears"
end=$((SECONDS + 60))
until k -n default get serviceaccount default >/dev/null 2>&1; do
  (( SECONDS < end )) || { echo "no default ServiceAccount after 60 s" >&2; exit 1; }
  sleep 1
done
k -n default get serviceaccount default

echo "--- scheduler: a Pod with no nodes gets FailedScheduling"
k -n default run meshless-smoke --image=registry.invalid/none:0 --restart=Never >/dev/null
end=$((SECONDS + 60))
until k -n default get events --field-selector reason=FailedScheduling,involvedObject.name=meshless-smoke \
    -o name 2>/dev/null | grep -q .; do
  (( SECONDS < end )) || { echo "no FailedScheduling event after 60 s" >&2; exit 1; }
  sleep 1
done
k -n default get events --field-selector involvedObject.name=meshless-smoke
k -n default delete pod meshless-smoke --wait=false >/dev/null
k -n default delete configmap meshless-smoke >/dev/null

echo "smoke: 1 passed, 0 failed"
