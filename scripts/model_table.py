"""Parameters, GFLOPs and CPU forward time per model config, as a Markdown table (README "Model variants").

    python scripts/model_table.py [--size 224] [--repeats 5] [--threads 2]

GFLOPs are counted by ``torch.utils.flop_counter`` for one image (multiply-add = 2 FLOPs) in the inference
forward (causal branch only); time is the median of ``--repeats`` batch-1 forwards after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from causalclipseg import create_model, list_models


def measure(name: str, size: int, repeats: int) -> dict[str, float]:
    model = create_model(name)
    image = torch.randn(1, 3, size, size)
    text = model.tokenize("bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.")
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(image, text)
        flops = counter.get_total_flops()
        per_module = counter.get_flop_counts()
        model(image, text)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(image, text)
            times.append(time.perf_counter() - start)
    def share(*modules: str) -> float:
        return sum(sum(per_module.get(f"CausalCLIPSeg.{m}", {}).values()) for m in modules) / flops

    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": flops / 1e9,
            "encoders": share("image_encoder", "text_encoder"), "decoder": share("neck", "decoder"),
            "causal": share("intervention"), "projector": share("projector"), "ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| variant | parameters (M) | GFLOPs ({args.size} px) | encoders / neck+decoder / causal / projector "
          f"(share of FLOPs) | CPU forward, batch 1, {args.threads} threads |")
    print("|---|---|---|---|---|")
    for name in list_models():
        r = measure(name, args.size, args.repeats)
        shares = " / ".join(f"{100 * r[k]:.0f}%" for k in ("encoders", "decoder", "causal", "projector"))
        print(f"| {name} | {r['params_m']:.2f} | {r['gflops']:.2f} | {shares} | {r['ms']:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
