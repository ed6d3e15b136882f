#!/usr/bin/env bash
# Makes the committed Optimum interop fixtures that tests/test_interop_optimum.py runs diffship on:
#
#   tests/fixtures/optimum/tiny-sd1/   the source: `diffship tiny-model --kind sd1` (diffusers format, safetensors),
#                                      text encoder weights renamed to the Hub layout (see below)
#   tests/fixtures/optimum/onnx/       `optimum-cli export onnx --task text-to-image` of it, as Optimum writes it
#   tests/fixtures/optimum/openvino/   `optimum-cli export openvino --task text-to-image --weight-format fp32` of it,
#                                      as Optimum writes it (tokenizer/openvino_{de,}tokenizer.* included, ~70 kB)
#   tests/fixtures/optimum/MANIFEST.json  commands, Optimum-venv versions, every file's size and sha256
#
# and, with --kind sdxl, the same for a tiny SDXL pipeline (`diffship tiny-model --kind sdxl`: two text encoders,
# CLIPTextModel and CLIPTextModelWithProjection, and two tokenizers) in tests/fixtures/optimum-sdxl/{tiny-sdxl,onnx,
# openvino,MANIFEST.json}; with --kind sd2, a tiny SD 2.x pipeline in tests/fixtures/optimum-sd2/ (for OpenVINO GenAI's
# tests). The sets are independent: making one never touches the other.
#
#   bash benchmarks/peers/make_optimum_fixtures.sh [--force] [--kind sd1|sd2|sdxl]     # default: --kind sd1
#
# Two venvs, because Optimum pins transformers 4.x and diffship's runs transformers 5: the source model is made
# with the main venv (.venv, or $MAIN_VENV), the exports with the Optimum venv (.venv-optimum, or $OPTIMUM_VENV;
# created by setup_optimum_venv.sh, which this script calls: a few seconds when it is up to date).
#
# Idempotent: an existing source model is kept, and the exports are remade only when the source's sha256 differs
# from the one MANIFEST.json records (or an export folder is missing). --force remakes everything. Each step writes
# to a temporary folder and replaces its target only when it succeeded. The exports run with the fixture folder as
# working directory and a relative --model, so the `_name_or_path` Optimum writes into the configs is "tiny-sd1"
# (or "tiny-sdxl"), not a path on this machine.
#
# Deterministic: the weights are seeded, the tiny model's BPE vocabulary is learnt with a fixed tie-break, and
# Optimum's exports of a given source are byte-identical run to run.
#
# The Hub layout: transformers 5 saves CLIPTextModel weights without the `text_model.` key prefix; transformers 4.x
# (Optimum's) then finds none of them and initialises the text encoder at random, warning "Some weights of
# CLIPTextModel were not initialized" -- Optimum would export a different text encoder from the one diffusers
# (transformers 5) runs. Hub checkpoints carry the prefix, and transformers 5 reads both, so the source is saved so
# (both text encoders of SDXL; CLIPTextModelWithProjection's `text_projection.weight` sits beside `text_model` and
# keeps its name). Before exporting, every text encoder is loaded with the Optimum venv's transformers and the
# fixture refused if a weight is missing or unexpected; the export logs are also searched for "newly initialized".
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MAIN_VENV="${MAIN_VENV:-$REPO_ROOT/.venv}"
OPTIMUM_VENV="${OPTIMUM_VENV:-$REPO_ROOT/.venv-optimum}"
HELPER="$REPO_ROOT/benchmarks/peers/optimum_fixtures.py"

FORCE=0
CHANGED=0
KIND=sd1
usage() { echo "usage: $0 [--force] [--kind sd1|sd2|sdxl]" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1 ;;
        --kind) [[ $# -ge 2 ]] || usage; KIND="$2"; shift ;;
        --kind=*) KIND="${1#--kind=}" ;;
        *) usage ;;
    esac
    shift
done
case "$KIND" in
    sd1) FIXTURES="$REPO_ROOT/tests/fixtures/optimum" ;;
    sd2) FIXTURES="$REPO_ROOT/tests/fixtures/optimum-sd2" ;;
    sdxl) FIXTURES="$REPO_ROOT/tests/fixtures/optimum-sdxl" ;;
    *) usage ;;
esac
SOURCE="tiny-$KIND"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0

if [[ ! -x "$MAIN_VENV/bin/diffship" ]]; then
    echo "error: no diffship in $MAIN_VENV: run scripts/setup_env.sh (or set MAIN_VENV)" >&2
    exit 1
fi
bash "$REPO_ROOT/benchmarks/peers/setup_optimum_venv.sh" "$OPTIMUM_VENV"

mkdir -p "$FIXTURES"
# Git must keep the files byte-exact (MANIFEST.json holds their sha256); written once, never rewritten.
if [[ ! -f "$FIXTURES/.gitattributes" ]]; then
    printf '%s\n' "# Byte-exact as make_optimum_fixtures.sh wrote them (MANIFEST.json holds their sha256): no end-of-line conversion." \
        "* -text" >"$FIXTURES/.gitattributes"
fi
TMP="$(mktemp -d "$FIXTURES/.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Runs a command with its output in a log; on failure prints the log's tail and stops.
logged() {
    local log="$1"; shift
    if ! "$@" >"$log" 2>&1; then
        echo "error: $* failed; last lines of $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
}

# 1. the source model (main venv)
if [[ $FORCE == 1 || ! -f "$FIXTURES/$SOURCE/model_index.json" ]]; then
    echo "making $SOURCE with diffship tiny-model (main venv)"
    logged "$TMP/tiny-model.log" "$MAIN_VENV/bin/diffship" tiny-model "$TMP/$SOURCE" --kind "$KIND"
    "$MAIN_VENV/bin/python" "$HELPER" hub-layout "$TMP/$SOURCE"
    rm -rf "${FIXTURES:?}/$SOURCE"
    mv "$TMP/$SOURCE" "$FIXTURES/$SOURCE"
    CHANGED=1
else
    echo "keeping $FIXTURES/$SOURCE (--force remakes it)"
    "$MAIN_VENV/bin/python" "$HELPER" hub-layout "$FIXTURES/$SOURCE"
fi

# 2. Optimum's exports of it (Optimum venv)
source_sha="$("$OPTIMUM_VENV/bin/python" "$HELPER" source-sha256 "$FIXTURES/$SOURCE")"
recorded_sha="$("$OPTIMUM_VENV/bin/python" -c 'import json, sys
try: print(json.load(open(sys.argv[1]))["source_sha256"])
except Exception: print("")' "$FIXTURES/MANIFEST.json")"
if [[ $FORCE == 1 || "$source_sha" != "$recorded_sha" || ! -f "$FIXTURES/onnx/unet/model.onnx" \
      || ! -f "$FIXTURES/openvino/unet/openvino_model.xml" ]]; then
    # transformers 4.x loading weights it cannot match would export a random model: refuse such a fixture.
    "$OPTIMUM_VENV/bin/python" "$HELPER" check-load "$FIXTURES/$SOURCE"
    rel_tmp="$(basename "$TMP")"
    cd "$FIXTURES"
    echo "exporting with optimum-cli export onnx"
    logged "$TMP/onnx.log" "$OPTIMUM_VENV/bin/optimum-cli" export onnx --model "$SOURCE" --task text-to-image \
        "$rel_tmp/onnx"
    echo "exporting with optimum-cli export openvino"
    logged "$TMP/openvino.log" "$OPTIMUM_VENV/bin/optimum-cli" export openvino --model "$SOURCE" \
        --task text-to-image --weight-format fp32 "$rel_tmp/openvino"
    # transformers 4.x loading weights it cannot match would export a random model: refuse such a fixture.
    if grep -h "newly initialized" "$TMP/onnx.log" "$TMP/openvino.log"; then
        echo "error: Optimum's transformers did not load every weight of $SOURCE (see above)" >&2
        exit 1
    fi
    for fmt in onnx openvino; do
        rm -rf "${FIXTURES:?}/$fmt"
        mv "$TMP/$fmt" "$FIXTURES/$fmt"
    done
    CHANGED=1
    cd "$REPO_ROOT"
else
    echo "keeping the Optimum exports: made from this $SOURCE (sha256 ${source_sha:0:12}); --force remakes them"
fi

# 3. the manifest (records the versions of the Optimum venv that made the exports, so only rewritten with them)
if [[ $CHANGED == 1 || ! -f "$FIXTURES/MANIFEST.json" ]]; then
    "$OPTIMUM_VENV/bin/python" "$HELPER" manifest "$FIXTURES" --kind "$KIND"
fi
echo "fixture set: $(du -s --apparent-size --block-size=1K "$FIXTURES" | cut -f1) kB in $FIXTURES"
