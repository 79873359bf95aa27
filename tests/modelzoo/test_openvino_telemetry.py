"""OpenVINO's converter must send no telemetry from this toolkit's processes: it forks a sender off a thread, which
offline can hang on a copied lock, and the process then waits for it at exit forever."""

import subprocess
import sys

from tests.conftest import ROOT

CHECK = """
import multiprocessing, torch
import modelzoo.openvino_backend
import openvino as ov
from openvino.tools.ovc import telemetry_utils
ov.convert_model(torch.nn.Linear(2, 2).eval(), example_input=torch.zeros(1, 2))
print(telemetry_utils.tm.__name__, len(multiprocessing.active_children()))
"""


def test_converting_a_model_starts_no_telemetry_sender():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "0"]
