"""The layout keeps experiment and training machinery out of what ``causalclipseg predict`` loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "sample_data" / \
    "sub-s11251_ses-e26227_run-1_bp-chest_vp-ap_cr.png"

# ignite and TensorBoard made unimportable, then `causalclipseg predict` run in this process; MONAI imports both
# only optionally, so nothing the prediction needs may import them
_RUN_BLOCKED = """
import sys
HEAVY = ("ignite", "tensorboard", "tensorboardX", "torch.utils.tensorboard")


class Block:
    def find_spec(self, name, path=None, target=None):
        if name in HEAVY or name.startswith(tuple(h + "." for h in HEAVY)):
            raise ImportError(f"{name} is blocked in this test")


sys.meta_path.insert(0, Block())
from causalclipseg.cli import main

rc = main(sys.argv[1:])
ours = ("causalclipseg.training", "causalclipseg.experiments", "causalclipseg.evaluation", "causalclipseg.bundle")
print("LOADED", sorted(m for m in sys.modules if m.startswith(HEAVY + ours)))
sys.exit(rc)
"""


@pytest.mark.slow
def test_predict_needs_neither_ignite_nor_tensorboard_nor_the_training_code(tmp_path):
    result = subprocess.run([sys.executable, "-c", _RUN_BLOCKED, "predict", str(SAMPLE), "--prompt",
                             "infection in the lower left lung", "--output-dir", str(tmp_path), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / f"{SAMPLE.stem}_mask.png").is_file()
    assert "LOADED []" in result.stdout, result.stdout
