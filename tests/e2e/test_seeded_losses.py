"""A seeded run's per-step losses are those of the committed reference, to the bit (tests/e2e/seeded_losses.json).

The reference was produced by the code before the pipeline was regrouped into stages; any change to the
maths, the packing, the sampling streams or the schedule shows up here as a changed bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_seeded_losses_equal_the_committed_reference():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "seeded_losses.py")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    want = json.loads((HERE / "seeded_losses.json").read_text())
    assert got.keys() == want.keys()
    for case in want:
        assert got[case] == want[case], f"{case}: the per-step losses changed"
