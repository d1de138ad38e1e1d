"""``causalclipseg <verb>``: predict, train, evaluate, verify-data. Each verb is a testable ``main(argv)``.

User errors end in one line on stderr (``error: ...``) and exit status 2; never a traceback. Torch, open_clip and
MONAI are imported by a verb once its arguments are parsed, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .data.prompts import PROMPT_SIDES
from .model.config import GAMES
from .registry import DEFAULT_MODEL, add_model_config, list_models

__all__ = ["main", "predict_main", "train_main", "evaluate_main", "compare_main", "worker_main"]

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)


def _fail(message: str) -> int:
    """Print ``error: <message>`` as one line on stderr (library messages may span several) and return 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _parser(verb: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of ``causalclipseg VERB``, defaults shown in ``--help``."""
    return argparse.ArgumentParser(prog=f"causalclipseg {verb}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _model_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", action="append", default=[], metavar="JSON",
                        help="a model config file (or a folder of them) to register under its file stem, so that "
                             "--model can name it; repeatable (a resumed run needs it again)")


def _register_model_configs(argv: Sequence[str] | None) -> str | None:
    """Register the ``--model-config`` files of ``argv`` before a parser offers ``--model``'s choices; returns the
    error message of a file that cannot be registered, else ``None``."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --model is not --model-config
    _model_config_arg(early)
    for path in early.parse_known_args(argv)[0].model_config:
        try:
            add_model_config(path)
        except USER_ERRORS as err:
            return str(err)
    return None


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list_models(), help="model variant")
    _model_config_arg(parser)
    parser.add_argument("--checkpoint", default=None,
                        help="CausalCLIPSeg weights (.pt or .safetensors); default: the weights shipped for "
                             f"'{DEFAULT_MODEL}'")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")


def _flip_tta_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flip-tta", action="store_true",
                        help="average each prediction with the one made on the image mirrored left-right under the "
                             "prompt with its sides swapped (flip test-time augmentation; twice the inference time)")


def predict_main(argv: Sequence[str] | None = None) -> int:
    """Segment image files or folders with a prompt; writes ``<name>_mask.*`` and ``<name>_overlay.png``."""
    if (error := _register_model_configs(argv)) is not None:
        return _fail(error)
    parser = _parser(
        "predict",
        "Segment what the prompt describes. 'Left' and 'right' in the prompt are the PATIENT's sides, "
        "as clinicians say (on a frontal X-ray in standard display the patient's left lung is on the "
        "image's right); use --prompt-side viewer for prompts naming the image's sides, such as "
        "QaTa-COV19's captions as written. Inputs: X-rays and slices as PNG/JPEG/BMP/TIFF (taken as "
        "stored, i.e. in standard display), DICOM files (shown as a viewer shows them: rescale, window, "
        "orientation), NIfTI/NRRD volumes or slices (oriented by their affine), folders of them, a folder "
        "holding one DICOM series (one volume), or a datalist JSON. Masks are written on the input's "
        "grid: PNG (0/255) for pictures, NIfTI (0/1, the input's geometry) for DICOM, NIfTI and NRRD; "
        "plus an overlay PNG for 2-D images.")
    parser.add_argument("inputs", nargs="+", help="image files, folders, DICOM series folders or datalist JSONs")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help='e.g. "bilateral pulmonary infection, two infected areas, lower left lung '
                                         'and lower right lung."')
    prompt.add_argument("--prompt-file", help="UTF-8 text file holding the prompt (safe for any punctuation)")
    parser.add_argument("--prompt-side", default="patient", choices=PROMPT_SIDES,
                        help="whose left the prompt's 'left' is: the patient's (clinical convention) or the viewer's "
                             "(the image's left as displayed; QaTa-COV19's captions)")
    parser.add_argument("--output-dir", default="causalclipseg_output", help="folder for masks and overlays")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability from which a pixel is lesion (>=)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--explain", action="store_true",
                        help="also write <name>_probability.nii.gz (the lesion probability) and, for a model with "
                             "a causal module, <name>_causal_mask.nii.gz (what it kept, averaged over its levels), "
                             "float32 in [0, 1] on the input's grid")
    _flip_tta_arg(parser)
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write <name>_seg.dcm: the mask as a DICOM Segmentation (highdicom) referencing the "
                             "source instances, on their pixel grid, its segment labelled with the prompt; DICOM "
                             "inputs only (a DICOM file or a folder holding one DICOM series), others are refused")
    _model_args(parser)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from .inference.predictor import Predictor
    from .inference.prompts import model_tokens
    from .io.dicom_seg import check_dicom_seg_input
    from .io.inputs import list_inputs
    from .tokenizer import read_prompt
    try:
        text = read_prompt(args.prompt, args.prompt_file, "--prompt-file")
        predictor = Predictor(args.model, args.checkpoint, device=args.device, threshold=args.threshold,
                              prompt_side=args.prompt_side, flip_tta=args.flip_tta)
        model_tokens(predictor.model, text, args.prompt_side)
    except USER_ERRORS as err:
        return _fail(str(err))
    files, failures = [], 0
    for item in args.inputs:  # an input that cannot be listed is one error line; the others still run
        try:
            files += list_inputs(item)
        except USER_ERRORS as err:
            failures += 1
            _fail(str(err))
    # the bar only on a terminal: redirected, stderr holds nothing but the one-line errors
    for path in tqdm(files, desc="predict", disable=len(files) < 2 or not sys.stderr.isatty()):
        try:
            if args.dicom_seg:
                check_dicom_seg_input(path)  # before the model runs on an input it refuses
            written = predictor.write(predictor.predict(path, text, explain=args.explain), args.output_dir,
                                      overwrite=args.overwrite, dicom_seg=args.dicom_seg)
        except USER_ERRORS as err:
            failures += 1
            _fail(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        print(f"{path} -> {', '.join(map(str, written))}")
    return 2 if failures else 0


_TRAIN_HELP = {
    "data": "dataset root (SGSeg or LViT layout) or MONAI datalist JSON",
    "output_dir": "run folder: checkpoints, best_model.pt, TensorBoard logs; an existing run there is resumed",
    "model": "model variant",
    "pretrained": "CLIP weights for the encoders: open_clip tag (e.g. openai) or file; omit to train from scratch",
    "init_checkpoint": "CausalCLIPSeg weights to start from (fine-tuning); applied after --pretrained",
    "encoder_lr_scale": "encoder learning-rate factor; default 0.1 with --pretrained, else 1.0",
    "reversal_max": "final gradient-reversal coefficient of the min-max game",
    "game": "how the min-max game is played: reversal (the trunk maximises the confounder head's bounded loss) or "
            "uninformative (the trunk drives the head's prediction to 0.5; one more decoder pass per step)",
    "lambda_dice": "weight of the per-image Dice term of the loss (Dice + BCE; 0.5 and 0.5 is the LViT convention)",
    "lambda_bce": "weight of the BCE term of the loss",
    "checkpoint_every": "save the resumable state every N iterations (and at each epoch end)",
    "max_train": "use only the first N training records (smoke runs)",
    "max_val": "use only the first N validation records",
    "num_workers": "data-loader worker processes",
    "device": "auto (CUDA when present), cpu, cuda, cuda:N",
    "amp": "mixed precision on CUDA",
    "prompt_transform": "none, or empty to train and validate without text (the text ablation)",
    "prompt_side": "whose left the model learns 'left' as: patient or viewer; default: as the data's captions say "
                   "(QaTa-COV19 and the LViT layout: viewer; a datalist: patient unless it says otherwise), or the "
                   "--init-checkpoint's when fine-tuning. Captions are translated to it and the model records it",
    "allow_config_change": "continue the run in --output-dir although this call's config differs from its "
                           "train_config.json (the differences are logged, then recorded); without it such a call is "
                           "refused. Output folder, device, workers, caching, progress bar and --checkpoint-every "
                           "may always change",
}


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type, exclude: Sequence[str] = ()) -> None:
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING
        help_text = _TRAIN_HELP.get(field.name, field.name.replace("_", " "))
        if field.type in ("bool",):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(field.type, str)
        kwargs: dict = {"type": kind, "help": help_text, "required": required}
        if not required:
            kwargs["default"] = field.default
        if field.name == "model":
            kwargs["choices"] = list_models()
        if field.name == "prompt_side":
            kwargs["choices"] = PROMPT_SIDES
        if field.name == "game":
            kwargs["choices"] = GAMES
        parser.add_argument(flag, **kwargs)


def train_main(argv: Sequence[str] | None = None) -> int:
    """Train (or resume) a model on a dataset."""
    if (error := _register_model_configs(argv)) is not None:
        return _fail(error)
    from .training.config import TrainConfig
    parser = _parser(
        "train",
        "Train CausalCLIPSeg with the adversarial min-max step; validates every --val-every epochs, "
        "keeps the best model by per-image Dice, and resumes an interrupted run from --output-dir "
        "(with the config it was started with: see --allow-config-change). The bundle's train.json and "
        "the MONAI Label app run this same trainer. Run `causalclipseg verify-data` on the dataset first.")
    _add_dataclass_args(parser, TrainConfig)
    _model_config_arg(parser)
    args = vars(parser.parse_args(argv))
    del args["model_config"]  # registered above
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from .training.trainer import train
    try:
        best = train(TrainConfig(**args))
    except USER_ERRORS as err:
        return _fail(str(err))
    print(json.dumps(best, indent=2))
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """Score a model on a dataset split under both metric protocols."""
    if (error := _register_model_configs(argv)) is not None:
        return _fail(error)
    parser = _parser(
        "evaluate",
        "Dice and IoU at threshold 0.5 under both protocols: per-image mean (LViT / CausalCLIPSeg "
        "papers) and dataset-level (areas accumulated over the set), each with a bootstrap 95% interval; "
        "then the same for the images whose captions say 'unilateral' and 'bilateral' (and those that say neither), "
        "also in --json (by_extent) and --csv (group).")
    parser.add_argument("--data", required=True, help="dataset root or MONAI datalist JSON")
    parser.add_argument("--split", default="valid", help="train, valid or test")
    parser.add_argument("--prompt-transform", default="none", choices=["none", "swap", "empty"],
                        help="evaluate with the prompts unchanged, left/right swapped, or empty (text reliance)")
    parser.add_argument("--mirror", action="store_true",
                        help="mirror every image and mask left-right and swap the prompts' sides with them (mirror "
                             "equivariance: a model that learned its flip augmentation scores as without it)")
    _flip_tta_arg(parser)
    parser.add_argument("--causal-stats", action="store_true",
                        help="also measure the causal masks (mean, kept on lesion vs background) and the confounder "
                             "head's Dice")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-images", type=int, default=None, help="score only the first N images")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--csv", default=None, help="write per-image rows here")
    parser.add_argument("--json", default=None, help="write the summary here")
    _model_args(parser)
    args = parser.parse_args(argv)
    from .evaluation.evaluate import causal_statistics, evaluate_model, split_loader
    from .inference.predictor import load_trained_model
    try:
        model = load_trained_model(args.model, args.checkpoint, device=args.device)
        loader = split_loader(model, args.data, args.split, args.batch_size, args.max_images, args.prompt_transform,
                              mirror=args.mirror, flip_tta=args.flip_tta)
        device = next(model.parameters()).device
        scores = evaluate_model(model, loader, device, progress=True, flip_tta=args.flip_tta)
        summary = scores.summary(n_resamples=args.bootstrap)
        by_extent = {group: scores.summary(n_resamples=args.bootstrap, group=group) for group in scores.groups}
        causal = causal_statistics(model, loader, device, progress=True) if args.causal_stats else None
    except USER_ERRORS as err:
        return _fail(str(err))
    print(f"{args.split} ({args.prompt_transform} prompts{', mirrored' if args.mirror else ''}"
          f"{', flip TTA' if args.flip_tta else ''}): {summary}")
    for group, group_summary in by_extent.items():
        print(f"  {group} captions: {group_summary}")
    if causal is not None:
        print("causal masks: " + ", ".join(f"{k} {v:.4f}" for k, v in causal.to_dict().items()))
    if args.csv:
        scores.to_csv(args.csv)
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "prompt_transform": args.prompt_transform,
                                               "mirror": args.mirror, "flip_tta": args.flip_tta,
                                               "model": args.model, **summary.to_dict(),
                                               **(causal.to_dict() if causal else {}),
                                               "by_extent": {g: v.to_dict() for g, v in by_extent.items()}},
                                              indent=2))
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    """Train every comparison arm with the same data and budget and tabulate their validation scores."""
    from .experiments.arms import ARMS
    from .training.config import TrainConfig
    parser = _parser(
        "compare",
        "Side by side, same data and budget: " + "; ".join(f"{k}: {a.label}" for k, a in ARMS.items())
        + ". Each arm is a training run (resumable) in OUTPUT_DIR/<arm>_seed<N>; the validation scores "
          "of each run's best epoch go to OUTPUT_DIR/comparison.json and comparison.md.")
    _add_dataclass_args(parser, TrainConfig, exclude=("model", "prompt_transform", "seed"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per arm and seed")
    parser.add_argument("--no-train", action="store_true",
                        help="only tabulate runs that have finished (e.g. trained by other processes); refuse, naming "
                             "them, if any has not")
    args = vars(parser.parse_args(argv))
    arms, seeds, train_runs = args.pop("arms"), args.pop("seeds"), not args.pop("no_train")
    from .experiments.compare import compare, format_table
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        result = compare(TrainConfig(**args), arms, seeds, train_runs)
    except USER_ERRORS as err:
        return _fail(str(err))
    print(format_table(result))
    return 0


def _benchmark_main(argv: Sequence[str] | None = None) -> int:
    from .experiments.benchmark import main as benchmark_main
    try:
        return benchmark_main(argv)
    except USER_ERRORS as err:
        return _fail(str(err))


def _verify_main(argv: Sequence[str] | None = None) -> int:
    from .data.verify import main as verify_main
    return verify_main(argv)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Keep the model loaded and segment the jobs named on stdin, one JSON answer per line on stdout."""
    parser = _parser(
        "worker",
        "A process for clients that segment often (the 3D Slicer module's local backend): reads the path "
        "of a job's request.json per line on stdin (input, prompt_file, output_dir, prompt_side, device, "
        "threshold, model, model_config, checkpoint, explain, flip_tta) and answers each with one JSON line on stdout: "
        '{"request": ..., "ok": true, "files": [...]} or {"request": ..., "ok": false, "error": ...}. '
        "A request runs what `causalclipseg predict ... --overwrite` runs; the loaded model is kept "
        "between requests, so only the first pays for starting Python, torch and the weights. The log "
        "(and anything else printed) goes to stderr. Exits when stdin closes or after --idle-timeout.")
    parser.add_argument("--idle-timeout", type=float, default=600.0,
                        help="exit after this many seconds without a request (frees the memory); 0: never")
    args = parser.parse_args(argv)
    if args.idle_timeout < 0:
        return _fail(f"--idle-timeout must be 0 (never) or positive seconds, got {args.idle_timeout:g}")
    from .inference.worker import run
    return run(args.idle_timeout or None)


VERBS: dict[str, tuple[Callable[[Sequence[str] | None], int], str]] = {
    "predict": (predict_main, "segment images from a text prompt"),
    "train": (train_main, "train or resume a model"),
    "evaluate": (evaluate_main, "score a model under both metric protocols"),
    "verify-data": (_verify_main, "check a dataset before training"),
    "compare": (compare_main, "train and tabulate the comparison arms on the same data and budget"),
    "benchmark": (_benchmark_main, "measure speed and memory per config, volumes and training, against a U-Net"),
    "worker": (worker_main, "keep the model loaded and segment the jobs named on stdin (3D Slicer's local backend)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``causalclipseg <verb> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        usage = "\n".join(f"  {verb:<12} {text}" for verb, (_, text) in VERBS.items())
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        print(f"usage: causalclipseg <verb> [options]   (causalclipseg <verb> --help)\n\nverbs:\n{usage}",
              file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    return VERBS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
