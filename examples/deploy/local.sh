#!/usr/bin/env bash
# A coordinator and two silos on this machine, over TLS with node authentication.
# Usage: bash examples/deploy/local.sh [WORK_DIR]   (default: ./deploy-local)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-deploy-local}"
mkdir -p "$work"
cd "$work"
port="${FEDTRAIN_PORT:-9092}"
[ -f keys/ca.key ] || fedtrain keys init keys --silo silo0 --silo silo1 --san 127.0.0.1
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait; }
trap cleanup EXIT
for s in silo0 silo1; do
  nproc=1; [ "$s" = silo0 ] && nproc=2
  fedtrain client --silo "$s" --server "127.0.0.1:$port" --nproc "$nproc" --work-dir "$s" \
    --tls-ca keys/ca.crt --auth-key "keys/silos/$s/auth_key" \
    --signing-key "keys/silos/$s/sign_key" > "$s.log" 2>&1 &
  pids+=($!)
done
fedtrain server --config "$here/run.toml" --run-dir run --address "127.0.0.1:$port" \
  --tls-dir keys
echo "outputs: $work/run (silo logs: $work/silo0.log, $work/silo1.log)"
