#!/usr/bin/env bash
# MONAI Label integration test of the ClinicalFMamba bundle (run before every release; see docs/monailabel.md).
#
#   scripts/monailabel_integration.sh            # prints the log and a PASS/FAIL summary; exit status 0 = PASS
#   scripts/monailabel_integration.sh --record   # also writes the output to docs/monailabel_integration_output.txt
#
# 1. creates the separate MONAI Label environment with scripts/monailabel_env.sh, or reuses it when its server
#    imports work;
# 2. builds a 2-channel NIfTI from the embedded sample docs/samples/BraTS-FLAIR-T1c (channel 0 FLAIR, 1 T1c) in a
#    temporary studies folder;
# 3. starts `monailabel start_server` with the app scripts/monailabel/fusion_app (a copy in the temporary folder,
#    so the server's logs/ model/ bin/ folders do not land in the repository) on 127.0.0.1 and a free port, with
#    outbound HTTP(S) sent to a dead proxy (nothing may be downloaded), and waits for /info/;
# 4. checks /info/ (model listed, type "others", no trainers), POSTs the sample to /infer/<model>?output=image with
#    params {"result_dtype": "float32", "result_extension": ".nii.gz"} and checks the fused image's shape, affine,
#    dtype and value range against the input; then the same request with 3D Slicer's params (uint8, .nrrd) must
#    still return float32 NIfTI; then output=json (the result parameters);
# 5. stops the server (always: EXIT trap, TERM then KILL of its process group) and prints the summary.
#
# Options: --weights FILE (serve this checkpoint; default models/model.pt, else a seed-0 random initialisation
# via --conf allow_untrained true, which the summary states), --keep (keep the temporary folder), --record.
# Environment: MONAILABEL_VENV (default .venv-monailabel), NICE (default "nice -n 19"), INSTALL_TIMEOUT (s, 5400),
# START_TIMEOUT (s, 900), INFER_TIMEOUT (s per request, 900), MONAILABEL_PORT (first port to try; default a free one).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MONAILABEL_VENV:-$ROOT/.venv-monailabel}"
NICE="${NICE-nice -n 19}"
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-5400}"
START_TIMEOUT="${START_TIMEOUT:-900}"
INFER_TIMEOUT="${INFER_TIMEOUT:-900}"
MODEL="clinicalfmamba_fusion"
RECORD_FILE="$ROOT/docs/monailabel_integration_output.txt"
WEIGHTS=""
KEEP=0
RECORD=0

while [ $# -gt 0 ]; do
    case "$1" in
        --weights)
            [ -f "${2:-}" ] || { echo "--weights: no such checkpoint file: ${2:-}" >&2; exit 2; }
            WEIGHTS="$(realpath "$2")"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --record) RECORD=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$RECORD" = 1 ]; then
    tmp_record="$(mktemp)"
    # re-run this script with its output copied to the record file (written only when the run ends)
    args=()
    [ -n "$WEIGHTS" ] && args+=(--weights "$WEIGHTS")
    [ "$KEEP" = 1 ] && args+=(--keep)
    "$0" "${args[@]}" > >(tee "$tmp_record") 2>&1 &
    inner=$!
    trap 'kill -TERM "$inner" 2>/dev/null' INT TERM HUP  # the inner run stops its server and prints its summary
    while :; do
        wait "$inner"
        status=$?
        kill -0 "$inner" 2>/dev/null || break
    done
    sleep 1  # let tee drain
    cp "$tmp_record" "$RECORD_FILE" && rm -f "$tmp_record"
    echo "(output recorded in ${RECORD_FILE#"$ROOT"/})"
    exit "$status"
fi

T0=$(date +%s)
WORK="$(mktemp -d -t clinicalfmamba_monailabel.XXXXXX)"
SERVER_PID=""
RESULTS=()   # "PASS|FAIL name"

log() { printf '[%s +%4ss] %s\n' "$(date -u +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*"; }
record() { RESULTS+=("$1 $2"); log "$1: $2"; }

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping the server (process group $SERVER_PID)"
        kill -TERM -- "-$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 30); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server still running after 30 s: SIGKILL"
            kill -KILL -- "-$SERVER_PID" 2>/dev/null
        fi
    fi
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
    if pgrep -g "$SERVER_PGID" >/dev/null 2>&1; then
        log "WARNING: processes of the server's group remain: $(pgrep -g "$SERVER_PGID" | tr '\n' ' ')"
    else
        log "server stopped"
    fi
}

summary() {
    local failed=0 total=${#RESULTS[@]}
    echo
    echo "================ MONAI Label integration summary ================"
    for r in "${RESULTS[@]}"; do
        echo "  $r"
        [ "${r%% *}" = "PASS" ] || failed=$((failed + 1))
    done
    echo "  weights: ${WEIGHTS_NOTE:-n/a}"
    echo "  total time: $(( $(date +%s) - T0 )) s"
    if [ "$total" -gt 0 ] && [ "$failed" -eq 0 ] && [ "${COMPLETED:-0}" = 1 ]; then
        echo "MONAI Label integration: PASS ($total/$total checks)"
        return 0
    fi
    echo "MONAI Label integration: FAIL ($([ "${COMPLETED:-0}" = 1 ] || echo 'the run did not complete; ')$failed of $total checks failed)"
    return 1
}

on_exit() {
    local rc=$?
    stop_child
    stop_server
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    summary
    local s=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ] && exit "$rc"
    exit "$s"
}
trap on_exit EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# Long steps run in the background and are waited for, so that a signal reaches the trap at once (bash runs traps
# only between foreground commands) and the trap can end them: CHILD_PID is a process-group leader (setsid).
CHILD_PID=""
# The child's output is redirected here, not around the call: a redirection around the call would also capture
# what the trap prints (the summary) when a signal arrives during the step.
run_child() {  # run_child [--out FILE | --log FILE] CMD...: run CMD in its own process group, wait, return its status
    case "$1" in
        --out) local out="$2"; shift 2; setsid "$@" > "$out" & ;;       # stdout to FILE
        --log) local out="$2"; shift 2; setsid "$@" > "$out" 2>&1 & ;;  # stdout and stderr to FILE
        *) setsid "$@" & ;;
    esac
    CHILD_PID=$!
    wait "$CHILD_PID"
    local rc=$?
    CHILD_PID=""
    return "$rc"
}
stop_child() {
    [ -n "$CHILD_PID" ] || return 0
    log "stopping the running step (process group $CHILD_PID)"
    kill -TERM -- "-$CHILD_PID" 2>/dev/null
    sleep 2
    kill -KILL -- "-$CHILD_PID" 2>/dev/null
    CHILD_PID=""
}

fail() { record FAIL "$1"; exit 1; }
server_log_tail() { echo "---- server log (last ${1:-60} lines) ----"; tail -n "${1:-60}" "$WORK/server.log" 2>/dev/null; echo "----"; }

log "ClinicalFMamba MONAI Label integration test"
log "bundle: $ROOT (commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git -C "$ROOT" status --porcelain -- scripts configs metadata.json 2>/dev/null)" ] && echo ', uncommitted changes in scripts/configs'))"
log "machine: $(uname -srm), $(nproc) CPUs, $(python3 --version 2>&1)"

# ---------------------------------------------------------------- 1. environment
env_ok() {
    "$VENV/bin/python" -c "import monailabel.interfaces.app, monailabel.tasks.infer.bundle" >/dev/null 2>&1
}
if [ -x "$VENV/bin/python" ] && env_ok; then
    log "reusing the MONAI Label environment $VENV"
    record PASS "environment (reused)"
else
    log "creating the MONAI Label environment $VENV (scripts/monailabel_env.sh, timeout ${INSTALL_TIMEOUT} s)"
    t_install=$(date +%s)
    if NICE="$NICE" MONAILABEL_VENV="$VENV" run_child --log "$WORK/install.log" \
        timeout "$INSTALL_TIMEOUT" "$ROOT/scripts/monailabel_env.sh" && env_ok; then
        record PASS "environment (installed in $(( $(date +%s) - t_install )) s, $(du -sh "$VENV" | cut -f1))"
        grep '^\[monailabel_env\]' "$WORK/install.log"
    else
        echo "---- install log (last 40 lines) ----"; tail -n 40 "$WORK/install.log"; echo "----"
        fail "environment (install failed or timed out after $(( $(date +%s) - t_install )) s)"
    fi
fi
"$VENV/bin/python" -c "import sys, monailabel, monai, torch, torchvision, numpy, pydicom; print(f'versions: python {sys.version.split()[0]}, monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}, pydicom {pydicom.__version__}')" \
    | while read -r line; do log "$line"; done

PY="$VENV/bin/python"
HELPER="$ROOT/scripts/monailabel/integration_check.py"

# ---------------------------------------------------------------- 2. sample and app copy
mkdir -p "$WORK/studies"
IMAGE_ID="$("$PY" "$HELPER" sample "$WORK/studies" 2> "$WORK/sample.log")" || { cat "$WORK/sample.log"; fail "sample 2-channel NIfTI"; }
INPUT="$WORK/studies/$IMAGE_ID.nii.gz"
log "$(cat "$WORK/sample.log")"
record PASS "sample 2-channel NIfTI ($IMAGE_ID)"
cp -r "$ROOT/scripts/monailabel/fusion_app" "$WORK/fusion_app"
rm -rf "$WORK/fusion_app/logs" "$WORK/fusion_app/model" "$WORK/fusion_app/bin"
find "$WORK/fusion_app" -name __pycache__ -prune -exec rm -rf {} +

CONF=(--conf sam2 false --conf bundle_path "$ROOT" --conf preload true)
if [ -n "$WEIGHTS" ]; then
    CONF+=(--conf weights "$WEIGHTS"); WEIGHTS_NOTE="checkpoint $WEIGHTS"
elif [ -f "$ROOT/models/model.pt" ]; then
    WEIGHTS_NOTE="bundle checkpoint models/model.pt"
elif [ -f "$ROOT/models/model.ts" ]; then
    WEIGHTS_NOTE="bundle TorchScript models/model.ts"
else
    CONF+=(--conf allow_untrained true)
    WEIGHTS_NOTE="UNTRAINED seed-0 initialisation (no models/model.pt; pass --weights FILE to test a checkpoint)"
fi
log "weights: $WEIGHTS_NOTE"

# ---------------------------------------------------------------- 3. server
DEAD_PROXY="http://127.0.0.1:9"
start_server() {  # start the server on $PORT in the background; its own process group (= its PID), so that
                  # stop_server can end it and every child
    log "starting: monailabel start_server --app <tmp copy of scripts/monailabel/fusion_app> --studies <tmp>/studies ${CONF[*]} --host 127.0.0.1 --port $PORT"
    setsid env PATH="$VENV/bin:$PATH" \
        HTTP_PROXY="$DEAD_PROXY" HTTPS_PROXY="$DEAD_PROXY" ALL_PROXY="$DEAD_PROXY" \
        http_proxy="$DEAD_PROXY" https_proxy="$DEAD_PROXY" all_proxy="$DEAD_PROXY" \
        NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost" \
        HF_HUB_OFFLINE=1 MONAI_LABEL_DATASTORE_AUTO_RELOAD=false \
        $NICE monailabel start_server --app "$WORK/fusion_app" --studies "$WORK/studies" "${CONF[@]}" \
        --host 127.0.0.1 --port "$PORT" > "$WORK/server.log" 2>&1 < /dev/null &
    SERVER_PID=$!
    SERVER_PGID=$SERVER_PID
    log "server pid $SERVER_PID, waiting up to ${START_TIMEOUT} s for $URL/info/"
}
wait_server() {  # 0: /info/ answered; 1: the server exited; 2: no answer within START_TIMEOUT
    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    until curl --noproxy '*' -sf --max-time 10 "$URL/info/" -o "$WORK/info.json"; do
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        [ "$(date +%s)" -lt "$deadline" ] || return 2
        sleep 3
    done
}
# The port is free when chosen, but another process may take it before the server binds it (the app loads first):
# then the server exits with "address already in use" and is started again on another free port (3 tries).
PORT="${MONAILABEL_PORT:-}"
for try in 1 2 3; do
    [ -n "$PORT" ] || PORT="$("$PY" "$HELPER" free-port)" || fail "free port"
    URL="http://127.0.0.1:$PORT"
    t_start=$(date +%s)
    start_server
    wait_server
    ws=$?
    [ "$ws" = 0 ] && break
    if [ "$ws" = 1 ] && [ "$try" -lt 3 ] && grep -qi "address already in use" "$WORK/server.log"; then
        log "port $PORT was taken before the server could bind it: trying another free port"
        stop_server
        PORT=""
        continue
    fi
    server_log_tail
    [ "$ws" = 1 ] && fail "server start (the server exited)"
    fail "server start (no /info/ within ${START_TIMEOUT} s)"
done
record PASS "server start (/info/ answered after $(( $(date +%s) - t_start )) s$([ "$try" -gt 1 ] && echo ", try $try"))"

# ---------------------------------------------------------------- 4. requests
if "$PY" "$HELPER" info "$URL" "$MODEL" > "$WORK/info_check.txt" 2>&1; then r=PASS; else r=FAIL; fi
cat "$WORK/info_check.txt"
record "$r" "/info/ lists $MODEL as an 'others' model, no trainers"
[ "$r" = PASS ] || { server_log_tail; exit 1; }

infer() {  # infer NAME OUTPUT PARAMS FILE; the HTTP status goes to $WORK/NAME.code
    run_child --out "$WORK/$1.code" curl --noproxy '*' -s --max-time "$INFER_TIMEOUT" -X POST \
        "$URL/infer/$MODEL?image=$IMAGE_ID&output=$2" -F "params=$3" -o "$4" -w '%{http_code}'
}

P1='{"result_dtype": "float32", "result_extension": ".nii.gz"}'
log "POST /infer/$MODEL?image=$IMAGE_ID&output=image  params=$P1"
t=$(date +%s)
infer float image "$P1" "$WORK/fused.nii.gz"
code="$(cat "$WORK/float.code" 2>/dev/null)"
log "HTTP $code in $(( $(date +%s) - t )) s, $(stat -c %s "$WORK/fused.nii.gz" 2>/dev/null || echo 0) bytes"
if [ "$code" = 200 ]; then record PASS "infer output=image (HTTP 200)"; else server_log_tail; fail "infer output=image (HTTP $code)"; fi
if "$PY" "$HELPER" check "$WORK/fused.nii.gz" "$INPUT" --label float32 > "$WORK/check1.txt" 2>&1; then r=PASS; else r=FAIL; fi
cat "$WORK/check1.txt"
record "$r" "fused image: float32 NIfTI, input shape and affine, values in [0, 1]"

P2='{"result_dtype": "uint8", "result_extension": ".nrrd"}'
log "POST /infer/$MODEL?image=$IMAGE_ID&output=image  params=$P2  (what 3D Slicer sends)"
t=$(date +%s)
infer slicer image "$P2" "$WORK/fused_slicer_params.nii.gz"
code="$(cat "$WORK/slicer.code" 2>/dev/null)"
log "HTTP $code in $(( $(date +%s) - t )) s"
if [ "$code" = 200 ] && "$PY" "$HELPER" check "$WORK/fused_slicer_params.nii.gz" "$INPUT" --label uint8-request > "$WORK/check2.txt" 2>&1; then r=PASS; else r=FAIL; fi
cat "$WORK/check2.txt" 2>/dev/null
record "$r" "uint8/.nrrd request still returns the float32 NIfTI"

log "POST /infer/$MODEL?image=$IMAGE_ID&output=json  params=$P1"
infer json json "$P1" "$WORK/result.json"
code="$(cat "$WORK/json.code" 2>/dev/null)"
log "HTTP $code: $(head -c 1200 "$WORK/result.json")"
if [ "$code" = 200 ] && "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['result_dtype']=='float32' and 0<=d['fused_min']<=d['fused_max']<=1, d" "$WORK/result.json" 2>/dev/null; then
    r=PASS; else r=FAIL; fi
record "$r" "infer output=json (result_dtype float32, fused_min/max in [0, 1])"

echo "---- server log excerpt ----"
grep -E "ClinicalFMamba|weights|Latencies|Result File|dropped bundle|result_dtype|result_extension|ERROR|Traceback" "$WORK/server.log" \
    | grep -v -E "Infer Request|Input Keys" | sed -E 's/^\[[^]]*\] \[[0-9]+\] //' | cut -c1-300 | tail -n 30
echo "----"
if grep -q "Traceback" "$WORK/server.log"; then server_log_tail 80; record FAIL "server log free of tracebacks"; else record PASS "server log free of tracebacks"; fi
# outbound HTTP(S) goes to the dead proxy 127.0.0.1:9: any download attempt fails and leaves one of these in the log
if grep -n -i -E "ProxyError|Cannot connect to proxy|URLError|127\.0\.0\.1:9\b|Max retries exceeded|Downloading" "$WORK/server.log" | head -5 | grep .; then
    record FAIL "no download / outbound connection attempted by the server"
else
    record PASS "no download / outbound connection attempted by the server"
fi

COMPLETED=1
failed=0
for r in "${RESULTS[@]}"; do [ "${r%% *}" = PASS ] || failed=1; done
exit "$failed"
