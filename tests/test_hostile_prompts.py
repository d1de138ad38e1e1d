"""Hostile prompts through ``causalclipseg predict``, the tokenizer and the bundle's prompt resolution.

Each prompt gets either a one-line error and exit status 2 before any file is read, or the documented handling
(module docstring of :mod:`causalclipseg.tokenizer`): long prompts truncated with a logged warning, and fast;
right-to-left and other non-Latin text accepted with a logged warning; carriage returns read as spaces.
"""

from __future__ import annotations

import random
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from causalclipseg import DEFAULT_MODEL, cli, create_model
from causalclipseg.bundle import resolve_prompt
from causalclipseg.tokenizer import PromptTokenizer, validate_prompt
from causalclipseg.training.checkpoint import save_weights

ROOT = Path(__file__).resolve().parents[1]
ARABIC = "عدوى رئوية ثنائية، منطقتان مصابتان، الرئة اليسرى السفلى والرئة اليمنى السفلى"
HEBREW = "זיהום ריאתי דו-צדדי, שני אזורים נגועים, ריאה שמאלית תחתונה"
_rng = random.Random(0)
ONE_WORD_10K = "".join(_rng.choice(string.ascii_lowercase) for _ in range(10_000))
WORDS_10K = ("lower left lung and upper right lung, " * 300)[:10_000]
PROMPT_FILE = "<an existing file>"  # replaced by the path of a real file

# (id, prompt, outcome): "ok", "warn:<phrase in the logged warning>", or "error:<phrase in the error>"
PROMPTS = [
    ("empty", "", "error:prompt must contain text"),
    ("whitespace", " \t\n  ", "error:prompt must contain text"),
    ("10k-words", WORDS_10K, "warn:prompt truncated from 10000 characters"),
    ("10k-one-word", ONE_WORD_10K, "warn:prompt truncated from 10000 characters"),
    ("arabic", ARABIC, "warn:no Latin letter"),
    ("hebrew", HEBREW, "warn:no Latin letter"),
    ("rtl-mixed-with-english", f"lower left lung {HEBREW[:12]}", "ok"),
    ("accented-latin", "lésion pulmonaire, poumon inférieur gauche", "ok"),
    ("nul", "lower left\x00lung", "error:control character '\\x00' (U+0000) at position 10"),
    ("escape", "\x1b[31mlower left lung\x1b[0m", "error:control character '\\x1b' (U+001B) at position 0"),
    ("delete", "lower left lung\x7f", "error:control character '\\x7f'"),
    ("carriage-return", "lower left lung\rupper right lung", "ok"),
    ("crlf-and-tab", "lower left lung,\r\n\tupper right lung", "ok"),
    ("punctuation-only", "...,;:!?()-'\"", "error:must contain a word"),
    ("symbols-only", "→ ✓ ★ 🫁", "error:must contain a word"),
    ("digit-only", "2", "ok"),
    ("undecodable-bytes", "lower left lung \udcff\udcfe", "error:undecodable bytes"),
    ("file-path", PROMPT_FILE, "error:is the name of a file"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_weights(create_model(DEFAULT_MODEL).state_dict(), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def xray(tmp_path) -> Path:
    path = tmp_path / "xray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64), dtype=np.uint8)).save(path)
    return path


def _real(prompt: str, tmp_path: Path) -> str:
    if prompt != PROMPT_FILE:
        return prompt
    path = tmp_path / "prompt.txt"
    path.write_text("lower left lung\n", encoding="utf-8")
    return str(path)


def _check(outcome: str, code: int, err: list[str], log: str) -> None:
    kind, _, phrase = outcome.partition(":")
    if kind == "error":
        assert code == 2, err
        assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
        return
    assert code == 0 and not err, err
    if kind == "warn":
        assert phrase in log, log
    else:
        assert "truncated" not in log and "Latin" not in log, log


# ------------------------------------------------------------------------------------------------- predict CLI
@pytest.mark.parametrize("prompt, outcome", [p[1:] for p in PROMPTS], ids=[p[0] for p in PROMPTS])
def test_predict_prompt(tmp_path, checkpoint, xray, capsys, caplog, prompt, outcome):
    out = tmp_path / "out"
    started = time.perf_counter()
    with caplog.at_level("WARNING"):
        code = cli.main(["predict", str(xray), "--prompt", _real(prompt, tmp_path), "--checkpoint", str(checkpoint),
                         "--output-dir", str(out), "--device", "cpu"])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    _check(outcome, code, captured.err.splitlines(), caplog.text)
    if outcome.startswith("error"):
        assert not out.exists(), "a refused prompt must stop before any file is read or written"
    else:
        assert (out / "xray_mask.png").is_file()
    assert elapsed < 30, f"{elapsed:.1f} s"


@pytest.mark.parametrize("content, outcome", [
    (b"lower left lung\n", "ok"),
    ("\ufefflower left lung\r\n".encode("utf-8"), "ok"),  # a BOM, as Windows editors write
    (ARABIC.encode("utf-8"), "warn:no Latin letter"),
    (b"lower left\x00lung", "error:control character"),
    (b"", "error:prompt must contain text"),
    ("poumon inférieur gauche".encode("latin-1"), "error:cannot read prompt file"),  # not UTF-8
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "error:cannot read prompt file"),  # a picture, not text
    (("lower left lung " * 70_000).encode("utf-8"), "warn:prompt truncated from 1119999 characters"),  # stripped
], ids=["plain", "bom-crlf", "arabic", "nul", "empty", "latin-1", "binary", "1-mb"])
def test_predict_prompt_file(tmp_path, checkpoint, xray, capsys, caplog, content, outcome):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_bytes(content)
    started = time.perf_counter()
    with caplog.at_level("WARNING"):
        code = cli.main(["predict", str(xray), "--prompt-file", str(prompt_file), "--checkpoint", str(checkpoint),
                         "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    _check(outcome, code, capsys.readouterr().err.splitlines(), caplog.text)
    assert time.perf_counter() - started < 30


@pytest.mark.slow
def test_cli_subprocess_control_character_prompt_is_one_plain_line(tmp_path, checkpoint, xray):
    result = subprocess.run([sys.executable, "-m", "causalclipseg.cli", "predict", str(xray), "--prompt",
                             "\x1b[2J\x1b[31mlower left lung", "--checkpoint", str(checkpoint), "--output-dir",
                             str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prompt contains the control character"), result.stderr
    assert "\x1b" not in result.stderr  # the escape is shown, not sent to the terminal
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- tokenizer
def test_truncation_keeps_the_tokens_of_the_whole_prompt_and_is_fast():
    tokenizer = PromptTokenizer(32)
    reference = SimpleTokenizer(context_length=32)
    word = ONE_WORD_10K[:3000]  # the reference BPE on one long word is slow; 3000 letters are past the cut
    for prompt in (WORDS_10K, word, ARABIC * 40, "left " + word, "left lung" + " " * 20_000):
        assert torch.equal(tokenizer(prompt), reference([prompt], context_length=32)), prompt[:40]
    started = time.perf_counter()
    tokens = tokenizer("".join(_rng.choice(string.ascii_lowercase) for _ in range(200_000)))  # one 200k-letter word
    assert time.perf_counter() - started < 5  # BPE on the whole word would take minutes
    assert tokens.shape == (1, 32) and tokens[0, -1] == tokenizer.eot_id


def test_validate_prompt_refuses_every_non_space_control_character():
    for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        char = chr(code)
        if char in "\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f":
            assert validate_prompt(f"left{char}lung") == f"left{char}lung"  # whitespace: read as a space
        else:
            with pytest.raises(ValueError, match="control character"):
                validate_prompt(f"left{char}lung")
    assert validate_prompt("", allow_empty=True) == ""  # the text-reliance ablation
    with pytest.raises(TypeError, match="prompt must be a str"):
        validate_prompt(b"left lung")


def test_warnings_are_logged_once(caplog):
    """Non-Latin: once per tokenizer; truncation: once per prompt (a folder of files would repeat them)."""
    tokenizer = PromptTokenizer(32)
    with caplog.at_level("WARNING"):
        tokenizer(HEBREW)
        tokenizer(ARABIC)
        for _ in range(3):
            tokenizer(WORDS_10K)
        tokenizer(WORDS_10K[:5000])
    assert caplog.text.count("no Latin letter") == 1
    assert caplog.text.count("prompt truncated from 10000 characters") == 1
    assert caplog.text.count("prompt truncated from 5000 characters") == 1
    tokens = tokenizer(HEBREW)
    assert tokens[0, 0] == tokenizer.sot_id and (tokens[0] == tokenizer.eot_id).sum() == 1


# ------------------------------------------------------------------------------------------------------ bundle
@pytest.mark.parametrize("prompt, outcome", [p[1:] for p in PROMPTS], ids=[p[0] for p in PROMPTS])
def test_bundle_resolve_prompt(tmp_path, prompt, outcome):
    prompt = _real(prompt, tmp_path)
    if outcome.startswith("error"):
        with pytest.raises(ValueError, match=None) as raised:
            resolve_prompt(prompt, argv=["x"])
        phrase = outcome.partition(":")[2]
        assert phrase.replace("prompt must contain text", "must contain text") in str(raised.value)
        assert "\n" not in str(raised.value)
    else:
        assert resolve_prompt(prompt, argv=["x"]) == prompt


def test_bundle_resolve_prompt_from_fire_values_and_files(tmp_path):
    # python-fire turns these command-line words into None, True, a dict and a list; the text is rebuilt
    assert resolve_prompt(None, argv=["x", "--prompt", "None"]) == "None"
    assert resolve_prompt(True, argv=["x", "--prompt", "True"]) == "True"
    assert resolve_prompt({"left": 1}, argv=["x", "--prompt", "{'left': 1}"]) == "{'left': 1}"
    assert resolve_prompt([1, 2], argv=["x"]) == "1, 2"
    with pytest.raises(ValueError, match="must contain text"):
        resolve_prompt(None, argv=["x"])
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_bytes(b"left\x1blung")
    with pytest.raises(ValueError, match="control character"):
        resolve_prompt(prompt_file=prompt_file, argv=["x"])
    prompt_file.write_bytes("poumon inférieur".encode("latin-1"))
    with pytest.raises(ValueError, match="cannot read prompt_file"):
        resolve_prompt(prompt_file=prompt_file, argv=["x"])
    prompt_file.write_text(f"{ARABIC}\n", encoding="utf-8")
    assert resolve_prompt(prompt_file=prompt_file, argv=["x"]) == ARABIC


@pytest.mark.slow
def test_bundle_subprocess_refuses_a_prompt_that_is_a_file_name(tmp_path, checkpoint, xray):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("lower left lung\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                             "--ckpt_path", str(checkpoint), "--progress", "False", "--input", str(xray),
                             "--output_dir", str(tmp_path / "out"), "--prompt", str(prompt_file)],
                            cwd=ROOT / "bundle", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=240)
    assert result.returncode != 0
    assert f"ValueError: prompt '{prompt_file}' is the name of a file: pass --prompt_file {prompt_file}" \
        in result.stdout, result.stdout[-3000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
