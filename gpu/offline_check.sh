#!/usr/bin/env bash
# `monai-prompt gpu-check` on a GPU machine with no package index, whose python3 already has a CUDA build of torch
# and the scientific stack (gpu/image.txt): installs the wheels `make gpu-kit` put in .whl/ (gpu/kit.txt) into a
# folder of their own, checks that the check's packages import, runs it from this checkout under a time limit, and
# copies the report, its log and the benchmark tables to $OUT (default runs/gpu_check_offline), also when the check
# fails or runs out of time. Arguments go to `monai-prompt gpu-check` (bundle names, --dry-run, --jobs N, ...).
#   GPU_KIT_DIR        the wheels (default .whl)
#   GPU_KIT_SITE       where they are installed (default /tmp/monai_prompt_kit)
#   GPU_CHECK_LIMIT_S  the check's time limit in seconds (default 540)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check_offline}
kit=${GPU_KIT_DIR:-.whl}
limit=${GPU_CHECK_LIMIT_S:-540}
work=""  # the check's runs, checkpoints and exports (a new temporary folder); $out gets the report and the tables
mkdir -p "$out"

collect() {  # quiet when the check wrote nothing, so that an early error stays the last line
    [ -f "$work/gpu_check.md" ] || return
    cp "$work/gpu_check.md" "$out/"
    for table in "$work"/efficiency_*/efficiency.json; do
        [ -f "$table" ] && cp "$table" "$out/$(basename "$(dirname "$table")").json"
    done
    echo "gpu/offline_check.sh: results in $out (the check's runs in $work)"
}
trap collect EXIT

if compgen -G "$kit/*.whl" >/dev/null; then
    site=${GPU_KIT_SITE:-/tmp/monai_prompt_kit}
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target "$site" "$kit"/*.whl || exit
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - "$kit" <<'PY' || exit
import importlib
import sys


def missing(modules):
    found = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            found.append(f"{module} ({err})")
    return ", ".join(found)


image = missing(("torch", "numpy", "PIL", "matplotlib", "einops", "safetensors", "yaml"))
if image:
    sys.exit(f"gpu/offline_check.sh: python3 ({sys.executable}) cannot import {image}, which the GPU machine's Python "
             "is expected to have (gpu/image.txt): put the Python that holds its CUDA build of torch first on PATH.")
kit = missing(("monai", "ignite", "nibabel"))
if kit:
    sys.exit(f"gpu/offline_check.sh: python3 cannot import {kit}: run `make gpu-kit` on a machine with a package "
             f"index and bring its {sys.argv[1]}/ here (add a missing package's wheel to gpu/kit.txt).")
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}", flush=True)
PY

work=$(mktemp -d)
timeout "$limit" python3 -m monai_prompt.cli gpu-check --out "$work" "$@" 2>&1 | tee "$out/gpu_check.log"
status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu/offline_check.sh: the check ran past GPU_CHECK_LIMIT_S=$limit s and was stopped; gpu_check.md holds" \
         "what it had finished" | tee -a "$out/gpu_check.log"
fi
exit "$status"
