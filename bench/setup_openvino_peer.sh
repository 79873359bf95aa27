#!/usr/bin/env bash
# The CPU peer for bench/cpu_speed.py: optimum-intel's OVStableDiffusionPipeline (OpenVINO), in its own venv because
# its pins (transformers<5.6, huggingface-hub<1.22, optimum~=2.3) conflict with this project's.
# Usage: bash bench/setup_openvino_peer.sh [VENV]   (default: .bench_venvs/optimum; a second run is instant)
# torch stays the CPU build 2.13.0 (a constraints file on every install): pip must never pull a CUDA torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.bench_venvs/optimum}"
STAMP="$VENV/.installed-optimum-intel-2.2.0"
if [ ! -f "$STAMP" ]; then
  python3.11 -m venv "$VENV"
  CONSTRAINTS="$VENV/constraints.txt"
  printf 'torch==2.13.0\n' > "$CONSTRAINTS"
  "$VENV/bin/pip" install --progress-bar off -q --upgrade pip
  "$VENV/bin/pip" install --progress-bar off -q torch==2.13.0
  "$VENV/bin/pip" install --progress-bar off -q -c "$CONSTRAINTS" "optimum-intel[openvino,diffusers]==2.2.0" pillow
  # optimum-intel requires torchvision, but PyPI's torchvision 0.28.0 does not load against this torch (operator
  # torchvision::nms does not exist), which breaks transformers' AutoProcessor import; the pipeline needs none of it.
  "$VENV/bin/pip" uninstall -y -q torchvision
  "$VENV/bin/python" -c "from optimum.intel import OVStableDiffusionPipeline"
  "$VENV/bin/python" -c "import torch; assert '+cpu' in torch.__version__ or not torch.version.cuda, torch.__version__"
  touch "$STAMP"
fi
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
print("peer venv:", ", ".join(f"{name} {version(name)}" for name in
                              ("optimum-intel", "openvino", "diffusers", "transformers", "torch")))
PY
