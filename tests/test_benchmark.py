"""The benchmark measures and reports (no timing assertions: benchmarks measure, tests check behaviour)."""

from __future__ import annotations

import json

import pytest

from causalclipseg import cli
from causalclipseg.experiments import benchmark


def test_linear_fit_recovers_a_line():
    fit = benchmark.linear_fit([16, 64, 256], [1.0 + 0.05 * n for n in (16, 64, 256)])
    assert fit["slope"] == pytest.approx(0.05) and fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0)


@pytest.fixture
def _keep_torch_threads():
    """The measurement functions set torch's thread count (they are meant for child processes); restore it."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_keep_torch_threads")
def test_inference_measurement_in_process_has_every_figure():
    row = benchmark.inference_benchmark("tiny", 64, (1, 2), repeats=1, threads=1)
    assert row["params_m"] > 1 and row["gflops"] > 0 and row["latency_ms"] > 0
    assert set(row["images_per_s"]) == {1, 2} and row["best_batch"] in (1, 2)
    assert set(row["time_share"]) == {"encoders", "decoder", "causal", "projector", "other"}
    assert sum(row["time_share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert all(v > 0 for k, v in row["time_share"].items() if k != "other")
    assert benchmark.inference_benchmark("unet", 64, (1,), repeats=1, threads=1)["time_share"] == {}


@pytest.mark.slow
def test_benchmark_command_writes_tables_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["benchmark", "--configs", "tiny", "--image-size", "64", "--batch-sizes", "1", "2",
                     "--repeats", "1", "--volume-slices", "2", "5", "--volume-size", "48", "--train-configs", "unet",
                     "--train-batch", "2", "--train-steps", "1", "--profile", "none", "--threads", "1",
                     "--json", str(out)]) == 0
    report = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["config"] for r in result["inference"]] == ["tiny", "unet"]
    unet = result["inference"][1]
    assert unet["latency_vs_unet"] == pytest.approx(1.0) and unet["gflops_vs_unet"] == pytest.approx(1.0)
    assert [v["slices"] for v in result["volumes"]] == [2, 5] and "slope" in result["volume_fit"]
    assert all(v["seconds"] > 0 and v["peak_rss_mb"] > 0 for v in result["volumes"])
    assert [(t["config"], t["device"]) for t in result["training"]] == [("unet", "cpu")]
    assert result["training"][0]["images_per_s"] > 0
    for heading in ("| tiny |", "| unet |", "48x48x5", "Fitted: seconds", "Training step"):
        assert heading in report


@pytest.mark.parametrize("args, rule", [(["--batch-sizes", "4", "8"], "start with 1"),
                                        (["--image-size", "100"], "multiple of 32"),
                                        (["--volume-slices", "0"], "positive")])
def test_benchmark_rejects_bad_sizes_in_one_line(args, rule, capsys):
    assert cli.main(["benchmark", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and rule in err and len(err.strip().splitlines()) == 1
