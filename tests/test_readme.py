"""The README's first command, as a user copies it: its segmentation step, parsed from README.md (so that the two
cannot drift), run from another working directory on the shipped sample, finds the sample's lesion. The README's
result tables match the JSON files they are generated from (scripts/readme_tables.py), the docs stand alone (no
reference to design notes outside the repository; relative links resolve), and help texts print as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


@pytest.mark.slow
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


# ------------------------------------------------------------------------------- generated tables and docs
TABLES_SCRIPT = ROOT / "scripts" / "readme_tables.py"


def _run_tables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TABLES_SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_result_tables_match_their_json_files():
    """Every result table in README.md and bundle/docs/README.md is what scripts/readme_tables.py renders from its
    JSON files: a number edited by hand, or a JSON file replaced without rerunning the script, fails here."""
    result = _run_tables("--check")
    assert result.returncode == 0, "stale tables (run `python scripts/readme_tables.py`):\n" + result.stderr


def _copy_of_the_documents(tmp_path: Path) -> Path:
    """The Markdown files with tables and every source file, copied under ``tmp_path`` as a repository root."""
    paths = ["README.md", "bundle/docs/README.md", "bundle/configs/metadata.json",
             "causalclipseg/weights/causalclipseg_qata_metrics.json",
             *(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.json"))]
    for rel in paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((ROOT / rel).read_bytes())
    return tmp_path


def test_check_names_the_stale_table_and_the_rewrite_fixes_it(tmp_path):
    root = _copy_of_the_documents(tmp_path)
    source = root / "docs" / "results" / "evaluate_valid_swap.json"
    data = json.loads(source.read_text())
    data["per_image/dice"] = 0.123456
    source.write_text(json.dumps(data))
    result = _run_tables("--check", "--root", str(root))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "table text-reliance is stale" in lines[0] and "0.123" in lines[0], result.stderr
    readme = (root / "README.md").read_text()
    assert "0.123 [" not in readme  # --check leaves the files alone

    result = _run_tables("--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| left and right swapped | 0.123 [" in (root / "README.md").read_text()
    assert _run_tables("--check", "--root", str(root)).returncode == 0


def test_check_reports_a_table_whose_markers_are_gone(tmp_path):
    root = _copy_of_the_documents(tmp_path)
    readme = root / "bundle" / "docs" / "README.md"
    readme.write_text(re.sub(r"<!-- table:bundle-performance (begin|end)[^>]*-->\n?", "", readme.read_text()))
    result = _run_tables("--check", "--root", str(root))
    assert result.returncode == 1
    assert "table bundle-performance is missing" in result.stderr, result.stderr


def test_bundle_metadata_metrics_are_the_training_runs():
    """metadata.json's eval_metrics are the shipped model's logged validation scores, to 4 decimals."""
    declared = json.loads((ROOT / "bundle" / "configs" / "metadata.json").read_text())["eval_metrics"]
    logged = json.loads((ROOT / "causalclipseg" / "weights" / "causalclipseg_qata_metrics.json").read_text())
    pairs = {"val_per_image_mean_dice": "per_image/dice", "val_per_image_mean_iou": "per_image/iou",
             "val_dataset_level_dice": "dataset_level/dice", "val_dataset_level_iou": "dataset_level/iou"}
    for key, source in pairs.items():
        assert declared[key] == round(logged[source], 4), (key, declared[key], logged[source])


def test_every_result_file_records_its_command():
    for path in sorted((ROOT / "docs" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        assert str(data.get("command", "")).startswith(("causalclipseg ", "OMP_NUM_THREADS=1 causalclipseg ")), path


def _text_files() -> list[Path]:
    skip = {"build", "work_dirs", "__pycache__", "node_modules"}
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).parts
        if any(part.startswith(".") or part in skip or part.endswith(".egg-info") for part in rel[:-1]):
            continue
        if path.is_file() and path.suffix in {".py", ".md", ".json", ".txt", ".toml", ".cfg", ".ui", ".sh", ".yml",
                                               ".yaml", ".conf", ".in"}:
            files.append(path)
    return files


def test_the_docs_stand_alone():
    """No file of the repository sends its reader to the team's design notes outside it; the docs pages say it."""
    needle = "DESIGN" + ".md"  # spelled apart so that this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in _text_files() if needle in p.read_text(errors="replace")]
    assert not offenders, f"{needle} is not shipped; point to docs/*.md instead: {offenders}"
    for page in ("method", "conventions", "metrics", "design"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), page


def test_relative_links_in_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_evaluate_help_shows_a_single_percent_sign(capsys):
    """argparse %-formats help texts: the evaluate verb's '95%' must print as written, not as '95%%' or an error."""
    from causalclipseg.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--help"])
    assert stop.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "bootstrap 95% interval" in shown and "%%" not in shown, shown
