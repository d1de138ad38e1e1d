"""The README's first command, as a user copies it: its segmentation step, parsed from README.md (so that the two
cannot drift), run from another working directory on the shipped sample, finds the sample's lesion."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def first_command() -> str:
    """The first line of the README's first ``bash`` block: the one a user copies to install and segment."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert block, "README.md has no ```bash block"
    return block.group(1).strip().splitlines()[0]


def test_first_command_installs_then_segments_the_shipped_sample():
    steps = [step.strip() for step in first_command().split("&&")]
    assert any(step.startswith("pip install") for step in steps), steps
    assert steps[-1].startswith("causalclipseg predict "), steps
    assert "../shared" not in first_command()  # runs on a fresh machine


def test_first_command_segments_the_sample_from_elsewhere(tmp_path):
    """The ``causalclipseg predict ...`` step with the repository-relative paths made absolute and the output
    directory in ``tmp_path``, run with another working directory; the prompt names the patient's side."""
    args = shlex.split(first_command().split("&&")[-1])[1:]  # after "causalclipseg"
    out = tmp_path / "out"
    args[args.index("--output-dir") + 1] = str(out)
    args = [str(ROOT / a) if not a.startswith("-") and (ROOT / a).exists() else a for a in args]
    images = [Path(a) for a in args if a.startswith(str(ROOT / "bundle" / "sample_data"))]
    assert len(images) == 1, f"the first command should segment the shipped sample: {args}"
    script = Path(sys.executable).parent / "causalclipseg"  # the console script the install put next to python
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "causalclipseg.cli"]
    result = subprocess.run(command + args, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    mask = np.array(Image.open(out / f"{images[0].stem}_mask.png")) > 0
    truth = np.array(Image.open(images[0].parent / "masks" / f"mask_{images[0].name}")) > 0
    dice = 2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum())
    assert dice >= 0.7, f"Dice {dice:.3f} of `{shlex.join(['causalclipseg', *args])}` against the sample's mask"
