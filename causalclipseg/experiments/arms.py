"""The arms of ``causalclipseg compare``, by name: which model each trains and which prompts it sees. Free of torch, so
that ``causalclipseg compare --help`` lists them at once; the comparison itself is
:mod:`causalclipseg.experiments.compare`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ARMS", "Arm"]


@dataclass(frozen=True)
class Arm:
    """One contender: a model variant and the prompt it sees in training and validation."""

    label: str
    model: str
    prompt_transform: str = "none"
    game: str = "reversal"


#: The comparison's arms, by name.
ARMS: dict[str, Arm] = {
    "causalclipseg": Arm("CausalCLIPSeg (tiny)", "tiny"),
    "no-causal": Arm("without the causal module (tiny-nocausal)", "tiny-nocausal"),
    "empty-prompt": Arm("CausalCLIPSeg, trained and validated with empty prompts", "tiny", "empty"),
    "unet": Arm("MONAI U-Net, vision only (unet)", "unet"),
    "uninformative": Arm("CausalCLIPSeg, uninformative-confounder game", "tiny", game="uninformative"),
    "public-masks": Arm("CausalCLIPSeg, the public code's mask generators (tiny-public-masks)", "tiny-public-masks"),
}
