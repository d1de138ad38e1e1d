"""Benchmarks (measurements, not tests): ``causalclipseg benchmark`` or ``python scripts/benchmark.py``.

One run measures, side by side on this machine:

1. **Inference** per model config on 224 px X-rays: images/s at batch 1 and at the best batch size, batch-1
   latency, peak resident memory, parameters, GFLOPs (``torch.utils.flop_counter``, multiply-add = 2 FLOPs),
   and where the batch-1 time goes (encoders, neck + decoder, causal module, projector, the rest), with the
   vision-only MONAI U-Net baseline (``unet``) and each config's latency and GFLOPs as a ratio to it.
2. **Volumes** 512 x 512 x N through :class:`~causalclipseg.inference.predictor.Predictor` (reading a NIfTI file,
   slice-wise inference in batches, thresholding): seconds and peak memory per N, the least-squares line
   ``seconds = a + b N``, and the peak memory beyond the input and output arrays (flat when slices stream).
3. **Training** images/s and peak memory per config (one min-max step: ``forward_aux``, loss, backward, AdamW),
   on the CPU, and with AMP on CUDA when ``--device`` names a GPU.
4. **Profile**: the operator table (self CPU time) of the default model's batch-1 forward.

Every measurement runs in a fresh child process (``spawn``), so each peak resident memory (``ru_maxrss``) is
that measurement's own. Times are medians over repeats after a warm-up. Results print as Markdown tables and
go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "run_benchmark", "inference_benchmark", "volume_benchmark", "training_benchmark",
           "profile_forward"]

PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
BASELINE = "unet"
#: Top-level modules of CausalCLIPSeg, grouped as in the tables.
PARTS = {"encoders": ("image_encoder", "text_encoder"), "decoder": ("neck", "decoder"), "causal": ("intervention",),
         "projector": ("projector",)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _median_seconds(fn: Callable[[], Any], repeats: int, min_seconds: float = 1.0) -> float:
    for _ in range(3):  # warm-up: oneDNN builds its kernels for each new shape on the first calls
        fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _setup(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def inference_benchmark(name: str, image_size: int, batch_sizes: Sequence[int], repeats: int,
                        threads: int) -> dict[str, Any]:
    """Throughput, latency, FLOPs and the batch-1 time per part of one config (run in a child process)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..factory import create_model
    from ..inference.predictor import inference_ready
    _setup(threads)
    model = inference_ready(create_model(name))  # as predict, the bundle and the MONAI Label app run it
    text = model.tokenize(PROMPT)
    image = torch.randn(1, 3, image_size, image_size)
    result: dict[str, Any] = {"config": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(image, text)
        result["gflops"] = counter.get_total_flops() / 1e9
        throughput = {}
        for b in batch_sizes:
            batch = image.expand(b, -1, -1, -1).contiguous()
            seconds = _median_seconds(lambda batch=batch: model(batch, text), repeats)
            throughput[b] = b / seconds
            if b == 1:
                result["latency_ms"] = 1000 * seconds
        best = max(throughput, key=throughput.get)
        result.update(images_per_s_batch1=throughput[batch_sizes[0]], best_batch=best,
                      images_per_s_best=throughput[best], images_per_s=throughput)
        result["time_share"] = _time_shares(model, image, text, repeats)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _time_shares(model: Any, image: Any, text: Any, repeats: int) -> dict[str, float]:
    """Fraction of the batch-1 forward spent in each group of :data:`PARTS` (forward hooks on those modules)."""
    spent = {part: 0.0 for part in PARTS}
    starts: dict[str, float] = {}
    handles = []
    for part, names in PARTS.items():
        for module_name in names:
            module = getattr(model, module_name, None)
            if module is None:
                continue
            handles.append(module.register_forward_pre_hook(
                lambda *_, key=module_name: starts.__setitem__(key, time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda *_, key=module_name, part=part: spent.__setitem__(
                    part, spent[part] + time.perf_counter() - starts[key])))
    if not handles:  # a model without these parts (the U-Net baseline)
        return {}
    total = 0.0
    for _ in range(3):  # warm-up
        model(image, text)
    for part in spent:
        spent[part] = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        model(image, text)
        total += time.perf_counter() - start
    for handle in handles:
        handle.remove()
    shares = {part: value / total for part, value in spent.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def volume_benchmark(slices: int, size: int, batch_size: int, threads: int) -> dict[str, Any]:
    """Segment a ``size x size x slices`` NIfTI volume with the shipped default model (run in a child process)."""
    import nibabel as nib

    from ..inference.predictor import Predictor
    _setup(threads)
    predictor = Predictor(batch_size=batch_size, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"volume_{slices}.nii.gz"
        rng = np.random.default_rng(0)
        data = rng.integers(-1000, 1000, size=(size, size, slices), dtype=np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.0, 1.0])), str(path))
        warm = Path(tmp) / "warm_up.nii.gz"
        nib.save(nib.Nifti1Image(data[..., :1], np.eye(4)), str(warm))
        del data
        predictor.predict(warm, PROMPT)  # lazy imports and first-call costs, outside the measurement
        before = _rss_mb()
        start = time.perf_counter()
        prediction = predictor.predict(path, PROMPT)
        seconds = time.perf_counter() - start
        peak = _peak_rss_mb()
    voxels = size * size * slices
    output_mb = (prediction.probability.nbytes + prediction.mask.nbytes) / 2**20
    return {"slices": slices, "size": size, "seconds": seconds, "seconds_per_slice": seconds / slices,
            "peak_rss_mb": peak, "rss_before_mb": before, "input_mb": voxels * 4 / 2**20, "output_mb": output_mb,
            "peak_beyond_arrays_mb": peak - before - voxels * 4 / 2**20 - output_mb}


def training_benchmark(name: str, image_size: int, batch_size: int, steps: int, threads: int,
                       device: str) -> dict[str, Any]:
    """Images/s of the min-max training step (AMP on CUDA), run in a child process."""
    import torch

    from ..factory import create_model, resolve_device
    from ..training.losses import CausalSegLoss
    from ..training.trainer import param_groups
    _setup(threads)
    dev = resolve_device(device)
    amp = dev.type == "cuda"
    model = create_model(name).to(dev).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(param_groups(model, 1e-4, 1.0, 1e-4))
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    loss_fn = CausalSegLoss()
    image = torch.randn(batch_size, 3, image_size, image_size, device=dev).contiguous(memory_format=torch.channels_last)
    label = (torch.rand(batch_size, 1, image_size, image_size, device=dev) > 0.7).float()
    text = model.tokenize(PROMPT).to(dev).expand(batch_size, -1)

    def step() -> None:
        with torch.autocast(dev.type, enabled=amp):
            terms = loss_fn(model.forward_aux(image, text, reversal=0.5), label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.step(optimizer)
        scaler.update()
        if amp:
            torch.cuda.synchronize()

    seconds = _median_seconds(step, steps)
    result = {"config": name, "device": str(dev), "amp": amp, "batch_size": batch_size,
              "images_per_s": batch_size / seconds, "peak_rss_mb": _peak_rss_mb()}
    if amp:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def profile_forward(name: str, image_size: int, threads: int, row_limit: int = 15) -> dict[str, Any]:
    """torch.profiler operator table of the batch-1 forward, sorted by self CPU time (run in a child process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..factory import create_model
    from ..inference.predictor import inference_ready
    _setup(threads)
    model = inference_ready(create_model(name))
    text = model.tokenize(PROMPT)
    image = torch.randn(1, 3, image_size, image_size)
    with torch.inference_mode():
        for _ in range(3):
            model(image, text)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(image, text)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return {"config": name, "table": table}


def _in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares line ``y = intercept + slope x`` and its coefficient of determination."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    predicted = intercept + slope * np.asarray(x, float)
    residual = float(np.sum((np.asarray(y) - predicted) ** 2))
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - residual / total if total else 1.0}


def run_benchmark(configs: Sequence[str], image_size: int = 224, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
                  repeats: int = 5, volume_slices: Sequence[int] = (16, 64, 256), volume_size: int = 512,
                  volume_batch: int = 8, train_configs: Sequence[str] | None = None, train_batch: int = 8,
                  train_steps: int = 3, device: str = "cpu", profile: str | None = "tiny",
                  threads: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """All measurements; see the module docstring. ``log`` receives progress lines."""
    threads = threads or os.cpu_count() or 1
    result: dict[str, Any] = {"threads": threads, "image_size": image_size, "machine": _machine()}
    names = list(dict.fromkeys([*configs, BASELINE]))
    inference = []
    for name in names:
        log(f"inference: {name}")
        inference.append(_in_child(inference_benchmark, name, image_size, tuple(batch_sizes), repeats, threads))
    base = next(r for r in inference if r["config"] == BASELINE)
    for row in inference:
        row["latency_vs_unet"] = row["latency_ms"] / base["latency_ms"]
        row["gflops_vs_unet"] = row["gflops"] / base["gflops"]
    result["inference"] = inference
    volumes = []
    for n in volume_slices:
        log(f"volume: {volume_size}x{volume_size}x{n}")
        volumes.append(_in_child(volume_benchmark, n, volume_size, volume_batch, threads))
    result["volumes"] = volumes
    if len(volumes) >= 2:
        result["volume_fit"] = linear_fit([v["slices"] for v in volumes], [v["seconds"] for v in volumes])
    training = []
    for name in (names if train_configs is None else train_configs):
        for dev in dict.fromkeys(["cpu", device]):
            log(f"training: {name} on {dev}")
            training.append(_in_child(training_benchmark, name, image_size, train_batch, train_steps, threads, dev))
    result["training"] = training
    if profile:
        log(f"profile: {profile}")
        result["profile"] = _in_child(profile_forward, profile, image_size, threads)
    result["load_average_at_end"] = os.getloadavg()
    return result


def _machine() -> dict[str, Any]:
    import platform

    import torch
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg()}  # other work on the cores inflates every time


def format_report(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_benchmark` result."""
    load = (result["machine"]["load_average_at_start"][0], result["load_average_at_end"][0])
    lines = [f"Load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f} on {result['machine']['cpu_count']} "
             "cores", "",
             f"Inference, {result['image_size']} px, {result['threads']} threads (ratios to the `{BASELINE}` "
             "baseline); time shares of the batch-1 forward: encoders / neck+decoder / causal / projector / rest",
             "", "| config | params (M) | GFLOPs | batch-1 latency | img/s batch 1 | img/s best (batch) "
             "| peak RSS | latency / U-Net | GFLOPs / U-Net | time shares |", "|---" * 10 + "|"]
    for r in result["inference"]:
        shares = " / ".join(f"{100 * r['time_share'][k]:.0f}%" for k in (*PARTS, "other")) if r["time_share"] else "-"
        lines.append(f"| {r['config']} | {r['params_m']:.2f} | {r['gflops']:.2f} | {r['latency_ms']:.1f} ms "
                     f"| {r['images_per_s_batch1']:.1f} | {r['images_per_s_best']:.1f} ({r['best_batch']}) "
                     f"| {r['peak_rss_mb']:.0f} MB | {r['latency_vs_unet']:.2f}x | {r['gflops_vs_unet']:.2f}x "
                     f"| {shares} |")
    if result["volumes"]:
        lines += ["", "Volumes (shipped default model, NIfTI in, mask out)", "",
                  "| volume | seconds | s/slice | peak RSS | input + output arrays | peak beyond those |",
                  "|---|---|---|---|---|---|"]
        for v in result["volumes"]:
            lines.append(f"| {v['size']}x{v['size']}x{v['slices']} | {v['seconds']:.2f} | "
                         f"{v['seconds_per_slice']:.3f} | {v['peak_rss_mb']:.0f} MB | "
                         f"{v['input_mb'] + v['output_mb']:.0f} MB | {v['peak_beyond_arrays_mb']:.0f} MB |")
        if "volume_fit" in result:
            fit = result["volume_fit"]
            lines.append(f"\nFitted: seconds = {fit['intercept']:.2f} + {fit['slope']:.4f} x N (R^2 = {fit['r2']:.4f})")
    if result["training"]:
        lines += ["", "Training step (forward_aux, loss, backward, AdamW)", "",
                  "| config | device | batch | img/s | peak RSS |", "|---|---|---|---|---|"]
        for t in result["training"]:
            gpu = f" (GPU {t['peak_gpu_mb']:.0f} MB)" if "peak_gpu_mb" in t else ""
            lines.append(f"| {t['config']} | {t['device']}{' AMP' if t['amp'] else ''} | {t['batch_size']} "
                         f"| {t['images_per_s']:.1f} | {t['peak_rss_mb']:.0f} MB{gpu} |")
    if "profile" in result:
        lines += ["", f"Profile of `{result['profile']['config']}` (5 batch-1 forwards)", "", "```",
                  result["profile"]["table"].rstrip(), "```"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``causalclipseg benchmark``: print the tables, optionally write JSON.

    Raises:
        ValueError: for unusable sizes.
    """
    from ..factory import list_models
    parser = argparse.ArgumentParser(prog="causalclipseg benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models = list_models()
    parser.add_argument("--configs", nargs="+", default=["tiny", "RN50", "RN101", "ViT-B-16"], choices=models,
                        help="configs to measure (the unet baseline is always added)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16],
                        help="inference batch sizes; the first is the latency batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--volume-slices", nargs="*", type=int, default=[16, 64, 256])
    parser.add_argument("--volume-size", type=int, default=512)
    parser.add_argument("--volume-batch", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--train-configs", nargs="*", default=None, choices=models,
                        help="configs for the training measurement (default: all measured configs)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="training is measured on the CPU and on this device")
    parser.add_argument("--profile", default="tiny", help="config to profile; 'none' skips it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.batch_sizes[0] != 1 or any(b < 1 for b in args.batch_sizes):
        raise ValueError(f"--batch-sizes must start with 1 (the latency batch) and be positive, got {args.batch_sizes}")
    if args.image_size % 32 or args.image_size < 32:
        raise ValueError(f"--image-size must be a positive multiple of 32, got {args.image_size}")
    if any(n < 1 for n in args.volume_slices) or args.volume_size < 1:
        raise ValueError("--volume-slices and --volume-size must be positive")
    result = run_benchmark(args.configs, args.image_size, args.batch_sizes, args.repeats, args.volume_slices,
                           args.volume_size, args.volume_batch, args.train_configs, args.train_batch,
                           args.train_steps, args.device, None if args.profile == "none" else args.profile,
                           args.threads, log=lambda line: print(line, file=sys.stderr, flush=True))
    result["command"] = "causalclipseg benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0
