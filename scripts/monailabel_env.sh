#!/usr/bin/env bash
# Create (or update) the separate MONAI Label environment for serving this bundle.
#
#   scripts/monailabel_env.sh                 # -> .venv-monailabel/ in the bundle root
#   MONAILABEL_VENV=/opt/ml-venv scripts/monailabel_env.sh
#
# Package registries only (PyPI through pip's ordinary configuration). Pins: scripts/monailabel/requirements.txt;
# when scripts/monailabel/constraints.txt exists (the `pip freeze` of a working install) it is applied as well,
# so a re-install gets exactly the versions that passed scripts/monailabel_integration.sh.
# After the install nothing needs the network: the app serves the local bundle, and the SAM2 model download is
# disabled by the app (and by `--conf sam2 false` in the documented commands).
#
# Environment: MONAILABEL_VENV (venv folder), PYTHON (interpreter for `-m venv`, default python3 >= 3.9),
# NICE (prefix for the pip commands, default "nice -n 19"; set NICE= to run at normal priority),
# MONAILABEL_NO_CONSTRAINTS=1 (ignore constraints.txt, e.g. to try newer releases).
# MONAILABEL_NEED_GB (free disk space, in GB, required before a cold install; default 10).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MONAILABEL_VENV:-$ROOT/.venv-monailabel}"
PYTHON="${PYTHON:-python3}"
NICE="${NICE-nice -n 19}"
REQS="$ROOT/scripts/monailabel/requirements.txt"
CONSTRAINTS="$ROOT/scripts/monailabel/constraints.txt"

log() { printf '[monailabel_env] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    # a cold install writes about 8.2 GB (torch 2.14.1 with its CUDA libraries, MONAI Label, ITK, MLflow): stop
    # with a clear message before pip runs out of space half-way
    need_gb="${MONAILABEL_NEED_GB:-10}"
    read -r free_kb mount < <(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4, $6}')
    if [ -n "${free_kb:-}" ] && [ "$free_kb" -lt $(( need_gb * 1024 * 1024 )) ]; then
        log "not enough disk space for $VENV: $(( free_kb / 1024 / 1024 )) GB free on $mount, a cold install needs about ${need_gb} GB (MONAILABEL_NEED_GB overrides)" >&2
        exit 3
    fi
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
else
    log "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
fi

pip_args=(install --disable-pip-version-check --no-cache-dir -r "$REQS")  # no cache: the CUDA wheels would be stored twice
if [ -f "$CONSTRAINTS" ] && [ "${MONAILABEL_NO_CONSTRAINTS:-0}" != "1" ]; then
    pip_args+=(-c "$CONSTRAINTS")
    log "using the lock file $CONSTRAINTS"
fi

start=$(date +%s)
# shellcheck disable=SC2086  # NICE is a word list on purpose
$NICE "$VENV/bin/python" -m pip "${pip_args[@]}"
log "pip install took $(( $(date +%s) - start )) s"

# The server's own imports, checked now rather than at the first request.
"$VENV/bin/python" - <<'PY'
import importlib, sys
import monai, monailabel, numpy, pydicom, torch, torchvision
import monailabel.interfaces.app  # fails with pydicom 3 (pydicom-seg)
import monailabel.tasks.infer.bundle  # fails with a torch/torchvision mismatch (torchvision::nms)
print(f"[monailabel_env] OK: python {sys.version.split()[0]}, monailabel {monailabel.__version__}, monai {monai.__version__}, "
      f"torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}, pydicom {pydicom.__version__}")
PY
log "environment ready: $VENV ($(du -sh "$VENV" 2>/dev/null | cut -f1))"
log "start the server with: PATH=\"$VENV/bin:\$PATH\" monailabel start_server --app $ROOT/scripts/monailabel/fusion_app --studies <studies> --conf sam2 false --host 127.0.0.1 --port 8000"
