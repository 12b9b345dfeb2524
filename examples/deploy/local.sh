#!/usr/bin/env bash
# A coordinator and two silos on this machine, over TLS with node authentication.
# Usage: bash examples/deploy/local.sh [WORK_DIR]   (default: ./deploy-local)
# Environment: FEDTRAIN_PORT (default 9092), the coordinator's port; FEDTRAIN_SET, config
# overrides for the coordinator, "key=value;key=value" (e.g. "model.preset=tiny;run.rounds=2").
# The silos start first: they retry until the coordinator is up. The script exits with the
# coordinator's exit code, after stopping the silos.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-deploy-local}"
mkdir -p "$work"
cd "$work"
port="${FEDTRAIN_PORT:-9092}"
sets=()
IFS=';' read -r -a items <<< "${FEDTRAIN_SET:-}"
for kv in ${items[@]+"${items[@]}"}; do
  kv="${kv#"${kv%%[![:space:]]*}"}"; kv="${kv%"${kv##*[![:space:]]}"}"  # trim
  [ -n "$kv" ] && sets+=(--set "$kv")
done
[ -f keys/ca.key ] || fedtrain keys init keys --silo silo0 --silo silo1 --san 127.0.0.1
pids=()
cleanup() {
  # SIGTERM: background jobs of a non-interactive shell ignore SIGINT.
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
for s in silo0 silo1; do
  nproc=1; [ "$s" = silo0 ] && nproc=2
  fedtrain client --silo "$s" --server "127.0.0.1:$port" --nproc "$nproc" --work-dir "$s" \
    --tls-ca keys/ca.crt --auth-key "keys/silos/$s/auth_key" \
    --signing-key "keys/silos/$s/sign_key" > "$s.log" 2>&1 &
  pids+=($!)
done
rc=0
fedtrain server --config "$here/run.toml" --run-dir run --address "127.0.0.1:$port" \
  --tls-dir keys ${sets[@]+"${sets[@]}"} || rc=$?
echo "outputs: $work/run (silo logs: $work/silo0.log, $work/silo1.log)"
exit "$rc"
