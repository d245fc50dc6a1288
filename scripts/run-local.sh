#!/usr/bin/env bash
# `make run`: start the core and the bridge on this machine, print the URL and the API key, stop both on Ctrl-C.
#
# The key: $MODELMAX_API_KEY when set; otherwise one generated on first run and kept in .modelmax/api-key
# (mode 600), so it stays the same across runs. The bridge listens on 127.0.0.1 only unless
# MODELMAX_BRIDGE_HOST says otherwise, so a local run is never open to the network by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

if [ -z "${MODELMAX_API_KEY:-}" ]; then
  mkdir -p .modelmax
  if [ ! -s .modelmax/api-key ]; then
    (umask 077 && "$PY" -c 'import secrets; print("mm-" + secrets.token_urlsafe(24))' > .modelmax/api-key)
  fi
  MODELMAX_API_KEY=$(cat .modelmax/api-key)
fi
export MODELMAX_API_KEY
# A laptop has no EC2 metadata service: without this, a Bedrock model with no credentials configured would make
# botocore wait on the link-local metadata address before failing. On EC2, set it to false.
export AWS_EC2_METADATA_DISABLED=${AWS_EC2_METADATA_DISABLED:-true}
export MODELMAX_LOG_FORMAT=${MODELMAX_LOG_FORMAT:-text}  # JSON lines are for log pipelines; this is a terminal
export MODELMAX_CORE_PORT=${MODELMAX_CORE_PORT:-50051}
export MODELMAX_BRIDGE_PORT=${MODELMAX_BRIDGE_PORT:-8000}
export MODELMAX_CORE_TARGET=${MODELMAX_CORE_TARGET:-127.0.0.1:${MODELMAX_CORE_PORT}}
host=${MODELMAX_BRIDGE_HOST:-127.0.0.1}

pids=()
stop() { trap - EXIT INT TERM; kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT INT TERM

"$PY" -m services & pids+=($!)
"$PY" -m bridge & pids+=($!)

# Ready when the bridge reports the core reachable and serving.
for _ in $(seq 1 120); do
  if "$PY" - "$host" "$MODELMAX_BRIDGE_PORT" <<'PYEOF' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/readyz", timeout=1).read()
PYEOF
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "modelmax: a process exited during start-up" >&2; exit 1; }; done
  sleep 0.5
done

cat <<BANNER

  ModelMax is running on the embedded model (smollm2-135m).

    URL:  http://${host}:${MODELMAX_BRIDGE_PORT}/v1
    Key:  ${MODELMAX_API_KEY}

  In another shell:
    export MODELMAX_API_KEY=${MODELMAX_API_KEY}
    export MODELMAX_BASE_URL=http://${host}:${MODELMAX_BRIDGE_PORT}/v1

  Ctrl-C stops the gateway.

BANNER
wait -n "${pids[@]}"
