"""Latency of the Slicer module's local backend on a 224 px X-ray: the warm model process against a new
``causalclipseg predict`` process per run.

Each run is timed as the module's Logic sees it, from *Segment* to the mask read back on the input's grid: the job
folder written (``prepare_job``: NIfTI, prompt, request.json), the request run (``ModelWorker`` or ``ProcessRunner``),
the mask read (``read_on_grid``). The worker's interpreter is this one (it must have ``causalclipseg``).

    python scripts/bench_slicer_worker.py                  # 5 runs through the worker, 2 predict processes
    python scripts/bench_slicer_worker.py --runs 10 --predict-runs 0 --json bench.json
    OMP_NUM_THREADS=1 python scripts/bench_slicer_worker.py    # the processes inherit the environment
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slicer_extension" / "TextPromptSegmentation"))

from TextPromptSegmentationLib.request import (  # noqa: E402
    SegmentationRequest,
    build_predict_command,
    child_environment,
    prepare_job,
)
from TextPromptSegmentationLib.runner import ProcessRunner, RunState  # noqa: E402
from TextPromptSegmentationLib.volume_io import read_on_grid  # noqa: E402
from TextPromptSegmentationLib.worker import ModelWorker  # noqa: E402

SAMPLE = ROOT / "bundle" / "sample_data" / "sub-s11251_ses-e26227_run-1_bp-chest_vp-ap_cr.png"
PROMPT = "infection in the lower left lung"  # the patient's left, as the sample's README words it
PNG_IJK_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # how Slicer places a picture: unit spacing, LPS axes


def load_xray(path: Path, size: int) -> np.ndarray:
    """The picture as Slicer holds it: (K=1, J=rows, I=columns), grey, resized to ``size`` when it is not."""
    image = Image.open(path).convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image)[None]


def timed_run(folder: Path, request: SegmentationRequest, array: np.ndarray, start_run) -> float:
    """Seconds from writing the job to the mask read back on the input's grid."""
    begin = time.perf_counter()
    job = prepare_job(folder, request, array, PNG_IJK_TO_RAS)
    run = start_run(job)
    state = run.wait(timeout=600)
    if state is not RunState.SUCCEEDED:
        run.raise_for_status()
        raise RuntimeError(f"the run ended {state.value}: {run.output[-5:]}")
    mask = read_on_grid(job.mask_file, array.shape, PNG_IJK_TO_RAS)
    seconds = time.perf_counter() - begin
    inside = getattr(run, "answer", None)
    print(f"  {seconds:7.3f} s  ({int(mask.sum())} lesion pixels"
          + (f"; {inside['seconds']:.3f} s of it in the worker's request" if inside else "") + ")", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image", type=Path, default=SAMPLE, help="a chest X-ray picture")
    parser.add_argument("--size", type=int, default=224, help="side of the X-ray in pixels")
    parser.add_argument("--runs", type=int, default=5, help="runs through the model process (the first starts it)")
    parser.add_argument("--predict-runs", type=int, default=2, help="runs of a new predict process each, to compare")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda")
    parser.add_argument("--checkpoint", default=None, help="weights; default: those shipped with the package")
    parser.add_argument("--explain", action="store_true", help="also write the probability and causal-mask maps")
    parser.add_argument("--json", type=Path, default=None, help="write the timings here")
    args = parser.parse_args(argv)
    if args.runs < 2 or args.predict_runs < 0:
        parser.error("--runs must be at least 2 (first and second Segment), --predict-runs at least 0")

    array = load_xray(args.image, args.size)
    request = SegmentationRequest(PROMPT, device=args.device, checkpoint=args.checkpoint, explain=args.explain)
    env = child_environment(os.environ, own_interpreter=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{args.image.name} as {array.shape[2]} x {array.shape[1]} px, device {args.device}, {cpus} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, python {sys.executable}", flush=True)
    worker = ModelWorker()

    def through_worker(job):
        run = worker.submit(sys.executable, job.request_file, env)
        run.start()
        return run

    def new_process(job):
        run = ProcessRunner(build_predict_command(sys.executable, job.request_file), env=env)
        run.start()
        return run

    with tempfile.TemporaryDirectory(prefix="bench_slicer_worker-") as tmp:
        print("model process (`causalclipseg worker`, kept between runs):", flush=True)
        try:
            warm = [timed_run(Path(tmp) / f"worker{i}", request, array, through_worker) for i in range(args.runs)]
        finally:
            worker.stop()
        if args.predict_runs:
            print("a new `causalclipseg predict` process per run:", flush=True)
        cold = [timed_run(Path(tmp) / f"predict{i}", request, array, new_process) for i in range(args.predict_runs)]
    result = {"image": args.image.name, "size": args.size, "device": args.device, "cpus": cpus,
              "worker_first_s": round(warm[0], 3), "worker_second_s": round(warm[1], 3),
              "worker_later_median_s": round(statistics.median(warm[1:]), 3),
              "predict_median_s": round(statistics.median(cold), 3) if cold else None,
              "worker_s": [round(s, 3) for s in warm], "predict_s": [round(s, 3) for s in cold]}
    print(f"first Segment {result['worker_first_s']:.2f} s, second {result['worker_second_s']:.2f} s, later runs "
          f"median {result['worker_later_median_s']:.2f} s"
          + (f"; a predict process per run: median {result['predict_median_s']:.2f} s" if cold else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
