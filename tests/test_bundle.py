"""The MONAI bundle in ``bundle/``: MONAI's own checks and the bundle's commands, run as subprocesses.

Every test runs the real command (``python -m monai.bundle ...``, ``torchrun``) on small inputs written here, with a
random tiny checkpoint (the trained weights are not needed): a PNG X-ray, a DICOM DX X-ray, an oblique NIfTI volume,
an NRRD volume and a small DICOM CT series. The bundle standing alone is checked with its own weights and sample: a
copy made elsewhere runs and passes MONAI's property check as given, and the Model Zoo's CI passes.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from causalclipseg import DEFAULT_MODEL, create_model
from causalclipseg.bundle import list_inputs, resolve_prompt
from causalclipseg.inference.predictor import Predictor
from causalclipseg.training.checkpoint import save_weights

from .conftest import write_dicom_image

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai" / "meta_schema_20240725.json"
ZOO_CI = Path(__file__).resolve().parents[2] / "shared" / "monai" / "model-zoo-ci" / "run"
PACKAGE_WEIGHTS = BUNDLE.parent / "causalclipseg" / "weights" / "causalclipseg_qata.pt"
PROMPT_A = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
PROMPT_B = "unilateral pulmonary infection, one infected area, upper right lung."


def _bundle(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in the bundle folder; output (stdout + stderr) in ``.stdout``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _infer(ckpt: Path, *args: str) -> subprocess.CompletedProcess:
    return _bundle("run", "--config_file", "configs/inference.json", "--ckpt_path", str(ckpt), "--progress", "False",
                   *args)


# ------------------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small inputs of every kind, and a random tiny checkpoint."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("bundle_data")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    files = {"ckpt": save_weights(create_model(DEFAULT_MODEL).state_dict(), root / "random_tiny.pt", half=True)}
    files["png"] = root / "xrays" / "patient1.png"
    files["png"].parent.mkdir()
    Image.fromarray((rng.random((72, 88)) * 255).astype(np.uint8)).save(files["png"])  # 72 rows x 88 columns
    files["dcm"] = write_dicom_image(root / "xrays" / "patient2.dcm", rng.integers(0, 4000, (64, 80)), "DX",
                                     generate_uid(), PixelSpacing=[0.2, 0.2])
    files["nii"] = root / "volume.nii.gz"
    oblique = np.array([[0.9, 0.3, 0.0, -20.0], [-0.3, 0.9, 0.2, 15.0], [0.0, -0.2, 2.5, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.random((40, 36, 5)).astype(np.float32), oblique), files["nii"])
    import nrrd

    files["nrrd"] = root / "scan.nrrd"
    nrrd.write(str(files["nrrd"]), rng.random((32, 40, 3)).astype(np.float32),
               {"space": "left-posterior-superior", "space directions": np.diag([0.8, 0.8, 3.0]),
                "space origin": np.array([1.0, 2.0, 3.0])})
    files["series"] = root / "ct_series"
    files["series"].mkdir()
    uid = generate_uid()
    for k in range(4):
        write_dicom_image(files["series"] / f"slice{k}.dcm", rng.integers(0, 2000, (48, 56)), "CT", uid,
                          ImagePositionPatient=[-10.0, -20.0, 5.0 + 2.5 * k],
                          ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[0.7, 0.9], SliceThickness=2.5,
                          InstanceNumber=k + 1)
    files["bad"] = root / "broken.png"
    files["bad"].write_text("this is not an image")
    return files


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    """A MONAI datalist JSON with a few 64 x 64 PNG images, masks and prompts."""
    root = tmp_path_factory.mktemp("bundle_train")
    rng = np.random.default_rng(1)
    records = []
    for i in range(4):
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[10:30, 5 + i:40] = 255
        Image.fromarray(mask).save(root / f"mask_img{i}.png")
        records.append({"image": f"img{i}.png", "label": f"mask_img{i}.png", "prompt": f"left lung, {i + 1} areas"})
    (root / "datalist.json").write_text(json.dumps({"training": records, "validation": records[:2],
                                                    "test": records[2:]}))
    return root / "datalist.json"


# ---------------------------------------------------------------------------------------------- MONAI's checks
@pytest.mark.slow
def test_verify_metadata_against_offline_schema():
    out = _ok(_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA)))
    assert "metadata is verified with no error" in out


def test_metadata_declares_image_then_text_and_pred():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image", "text"]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lesion"}
    assert meta["version"] in meta["changelog"]
    assert "causalclipseg" in meta["required_packages_version"]
    assert "research only" in meta["intended_use"].lower()


@pytest.mark.slow
def test_verify_net_in_out_with_the_text_input():
    out = _ok(_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                      "--config_file", "configs/inference.json", "--device", "cpu", "--any", "96",
                      "--extra_forward_args", "{'text': [49406, 1823, 9518, 49407]}"))
    assert "data shape of network is verified with no error" in out


@pytest.mark.slow
def test_ckpt_export_torchscript_equals_eager(data, tmp_path):
    ts_path = tmp_path / "model.ts"
    _ok(_bundle("ckpt_export", "export_network", "--filepath", str(ts_path), "--ckpt_file", str(data["ckpt"]),
                "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"))
    exported = torch.jit.load(str(ts_path))
    model = create_model(DEFAULT_MODEL, checkpoint=data["ckpt"])
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for prompt in (PROMPT_A, PROMPT_B):  # neither is the prompt the export was traced with
            tokens = model.tokenize(prompt)
            torch.testing.assert_close(exported(image, tokens), model(image, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_infer_and_train_properties(train_data, data, tmp_path):
    out = f", output_dir={str(tmp_path)!r}"  # building the handlers creates TensorBoard files there
    script = (
        "from monai.bundle import ConfigWorkflow\n"
        f"w = ConfigWorkflow(config_file='configs/inference.json', workflow_type='infer',"
        f" input={str(data['png'])!r}{out})\n"
        "w.initialize(); print('infer', w.check_properties())\n"
        f"w = ConfigWorkflow(config_file='configs/train.json', workflow_type='train',"
        f" dataset_dir={str(train_data)!r}{out})\n"
        "w.initialize(); print('train', w.check_properties())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=BUNDLE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "infer []" in result.stdout and "train []" in result.stdout, result.stdout


def test_model_zoo_ci_rules():
    for path in BUNDLE.rglob("*"):
        if path.is_file():  # follows links: models/model.pt once the trained weights exist
            assert path.stat().st_size <= 25 * 1024 * 1024, f"{path} is over 25 MB: list it in large_files.yml"
    for path in (BUNDLE / "configs").glob("*.json"):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path.name} is not pretty-printed"
    assert not (BUNDLE / "models" / "model.pt").is_symlink()  # a zip or zoo checkout keeps a link, broken
    for name in ("LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
        assert (BUNDLE / name).is_file(), name
    readme = (BUNDLE / "docs" / "README.md").read_text().lower()
    for heading in ("model overview", "data", "preprocessing", "performance", "system configuration", "limitations",
                    "citation"):
        assert f"# {heading}" in readme, heading


def test_model_pt_is_the_package_weights():
    model = BUNDLE / "models" / "model.pt"
    assert model.is_file() and not model.is_symlink()
    assert filecmp.cmp(model, PACKAGE_WEIGHTS, shallow=False), \
        f"{model} differs from {PACKAGE_WEIGHTS}: copy the package's weights into the bundle"


@pytest.mark.slow
def test_model_zoo_ci_passes():
    """The Model Zoo's own ``ci/verify_bundle.py`` (offline copy), TorchScript skipped the zoo's way (see the bundle's
    docs: ``torch.jit.script`` cannot compile the network; the traced export is checked above)."""
    if not ZOO_CI.is_file():
        pytest.skip(f"the Model Zoo's CI scripts are not at {ZOO_CI.parent}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its `python`: ours
    result = subprocess.run([str(ZOO_CI), str(BUNDLE), "full", "--no-torchscript"], env=env, timeout=600,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
    for step in ("directory is verified correctly", "version and changelog are verified correctly",
                 "metadata format is verified correctly", "data shape is verified correctly"):
        assert step in result.stdout, result.stdout[-4000:]


# ---------------------------------------------------------------------------------------------- the bundle alone
@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    """``bundle/`` copied elsewhere, as a user or the Model Zoo gets it (links kept as links), without outputs."""
    copy = tmp_path_factory.mktemp("elsewhere") / "causalclipseg_bundle"
    shutil.copytree(BUNDLE, copy, symlinks=True, ignore=shutil.ignore_patterns("eval", "model.ts", "__pycache__"))
    return copy


def _sample() -> tuple[Path, Path]:
    """The shipped sample X-ray and its ground-truth mask (relative to the bundle folder)."""
    (image,) = (BUNDLE / "sample_data").glob("*.png")
    return image.relative_to(BUNDLE), (image.parent / "masks" / f"mask_{image.name}").relative_to(BUNDLE)


def test_the_default_input_is_the_sample_xray_alone():
    image, mask = _sample()
    assert (BUNDLE / mask).is_file() and (BUNDLE / "sample_data" / "caption.txt").is_file()
    assert (BUNDLE / "sample_data" / "LICENSE").is_file() and (BUNDLE / "sample_data" / "README.md").is_file()
    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert config["input"] == "@dataset_dir" and config["dataset_dir"] == "$@bundle_root + '/sample_data'"
    assert list_inputs(BUNDLE / "sample_data") == [{"image": str(BUNDLE / image)}]  # not the mask, not the texts


@pytest.mark.slow
def test_a_copy_runs_with_no_overrides(bundle_copy):
    """``run`` as given, in a copy of the bundle: the shipped weights segment the shipped sample with the default
    prompt (the patient's side), and only the X-ray."""
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"],
                            cwd=bundle_copy, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _ok(result)
    image, truth_path = _sample()
    written = sorted(p.name for p in (bundle_copy / "eval").iterdir())
    assert written == [f"{image.stem}_mask.nii.gz", f"{image.stem}_mask.png"], written
    mask = np.array(Image.open(bundle_copy / "eval" / f"{image.stem}_mask.png")) > 0
    truth = np.array(Image.open(bundle_copy / truth_path)) > 0
    dice = 2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum())
    assert dice >= 0.7, f"Dice {dice:.3f} on the shipped sample"


@pytest.mark.slow
def test_infer_properties_of_the_config_as_given(bundle_copy):
    script = ("from monai.bundle import ConfigWorkflow\n"
              "w = ConfigWorkflow(config_file='configs/inference.json', workflow_type='infer',"
              " meta_file='configs/metadata.json', logging_file='configs/logging.conf')\n"
              "w.initialize(); print('missing', w.check_properties())\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=bundle_copy, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "missing []" in result.stdout, result.stdout


# --------------------------------------------------------------------------------------------------- inference
@pytest.mark.slow
def test_infer_folder_of_xrays_png_and_dicom(data, tmp_path):
    from monai.transforms import LoadImage

    out = _ok(_infer(data["ckpt"], "--input", str(data["png"].parent), "--output_dir", str(tmp_path),
                     "--progress", "True"))
    assert "images" in out  # the progress bar over the folder
    png_mask = np.array(Image.open(tmp_path / "patient1_mask.png"))
    assert png_mask.shape == (72, 88) and set(np.unique(png_mask)) <= {0, 255}
    assert nib.load(tmp_path / "patient1_mask.nii.gz").shape == (88, 72)  # MONAI's axis order: x = columns
    dcm_in = LoadImage(image_only=True, reader="PydicomReader")(str(data["dcm"]))  # the package's DICOM reader
    dcm_mask = nib.load(tmp_path / "patient2_mask.nii.gz")
    assert dcm_mask.shape == tuple(s for s in dcm_in.shape if s != 1)
    np.testing.assert_allclose(dcm_mask.affine, dcm_in.affine.numpy(), atol=1e-5)
    assert (tmp_path / "patient2_mask.png").is_file()


@pytest.mark.slow
def test_infer_volumes_keep_their_grid(data, tmp_path):
    from monai.transforms import LoadImage

    datalist = tmp_path / "volumes.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(data[k])} for k in ("nii", "nrrd", "series")]}))
    _ok(_infer(data["ckpt"], "--input", str(datalist), "--output_dir", str(tmp_path / "out"), "--batch_size", "2"))
    source = nib.load(data["nii"])
    mask = nib.load(tmp_path / "out" / "volume_mask.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)  # oblique direction, spacing and origin
    assert mask.get_data_dtype() == np.uint8
    for key, name, reader in (("nrrd", "scan_mask.nii.gz", "NrrdReader"),
                              ("series", "ct_series_mask.nii.gz", "PydicomReader")):
        loaded = LoadImage(image_only=True, reader=reader)(str(data[key]))  # the package's readers, even with ITK
        written = nib.load(tmp_path / "out" / name)
        assert written.shape == tuple(loaded.shape), key
        np.testing.assert_allclose(written.affine, loaded.affine.numpy(), atol=1e-4)
    series = nib.load(tmp_path / "out" / "ct_series_mask.nii.gz")
    np.testing.assert_allclose(np.linalg.norm(series.affine[:3, :3], axis=0), [0.9, 0.7, 2.5], atol=1e-4)


@pytest.mark.slow
def test_prompt_with_commas_and_digits_arrives_intact(data, tmp_path):
    out = _ok(_infer(data["ckpt"], "--input", str(data["png"]), "--output_dir", str(tmp_path),
                     "--prompt", "left, right, 2"))
    assert "prompt: 'left, right, 2'" in out  # python-fire would have passed ('left', 'right', 2)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("@bilateral, 3 infected areas, upper left lung.\n", encoding="utf-8")
    out = _ok(_infer(data["ckpt"], "--input", str(data["png"]), "--output_dir", str(tmp_path),
                     "--prompt_file", str(prompt_file)))
    assert "prompt: '@bilateral, 3 infected areas, upper left lung.'" in out


def test_resolve_prompt_rebuilds_fire_tuples():
    argv = ["x", "run", "--prompt", "left,  right 2"]
    assert resolve_prompt(("left", "right 2"), argv=argv) == "left,  right 2"
    assert resolve_prompt(("left", 2), argv=["x"]) == "left, 2"
    assert resolve_prompt(7, argv=["x", "--prompt=7"]) == "7"
    with pytest.raises(ValueError, match="prompt must contain text"):
        resolve_prompt("  ")


@pytest.mark.slow
def test_two_prompts_give_different_masks(data, tmp_path):
    """With random weights the lesion probabilities differ between prompts only slightly and mostly lie on one
    side of 0.5; so the threshold is set at the median probability of prompt A (computed here with the same
    network), and the test checks that the masks the bundle writes for A and B differ: the prompt given on the
    command line reaches the network. It does not check that either mask is right."""
    threshold = float(np.median(Predictor(DEFAULT_MODEL, data["ckpt"], device="cpu").predict(data["png"], PROMPT_A)
                                .probability))
    masks = []
    for i, prompt in enumerate((PROMPT_A, PROMPT_B)):
        _ok(_infer(data["ckpt"], "--input", str(data["png"]), "--output_dir", str(tmp_path / str(i)),
                   "--prompt", prompt, "--threshold", repr(threshold)))
        masks.append(nib.load(tmp_path / str(i) / "patient1_mask.nii.gz").get_fdata())
    assert 0 < masks[0].mean() < 1  # prompt A's mask is neither empty nor full at its median
    assert (masks[0] != masks[1]).any()


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing", "input not found: "),
    ("bad", "cannot read "),
    ("empty_prompt", "prompt must contain text"),
])
def test_clear_errors(data, tmp_path, case, message):
    args = {"missing": ["--input", str(tmp_path / "nothere.png")],
            "bad": ["--input", str(data["bad"])],
            "empty_prompt": ["--input", str(data["png"]), "--prompt", "   "]}[case]
    result = _infer(data["ckpt"], *args, "--output_dir", str(tmp_path))
    assert result.returncode != 0
    line = next((x for x in result.stdout.splitlines() if re.match(r"(ValueError|FileNotFoundError): ", x)), "")
    assert message in line, result.stdout[-3000:]
    if case == "missing":
        assert "nothere.png" in line
    if case == "bad":
        assert "broken.png" in line


@pytest.mark.slow
def test_bundle_and_predictor_run_one_path_to_the_same_masks(data, tmp_path):
    """One inference path: on a PNG, a DICOM X-ray, an oblique NIfTI and a DICOM series, the bundle's inference.json
    writes exactly the masks of the package's Predictor. With random weights the probabilities cluster, so the
    threshold is their pooled median, taken as one of the probabilities themselves (each mask is then neither empty
    nor full, and the voxels at the threshold show that both apply the one rule, ``>=``)."""
    kinds = ("png", "dcm", "nii", "series")
    predictor = Predictor(DEFAULT_MODEL, data["ckpt"], device="cpu")
    pooled = np.concatenate([predictor.predict(data[k], PROMPT_A).probability.ravel() for k in kinds])
    threshold = float(np.quantile(pooled, 0.5, method="lower"))
    predictor.configure(threshold, "patient")
    datalist = tmp_path / "inputs.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(data[k])} for k in kinds]}))
    _ok(_infer(data["ckpt"], "--input", str(datalist), "--output_dir", str(tmp_path / "out"), "--prompt", PROMPT_A,
               "--threshold", repr(threshold)))
    for kind in kinds:
        name = data[kind].name.split(".")[0]
        written = nib.load(tmp_path / "out" / f"{name}_mask.nii.gz").get_fdata()
        prediction = predictor.predict(data[kind], PROMPT_A)
        assert 0 < prediction.mask.mean() < 1, kind
        np.testing.assert_array_equal(prediction.mask, prediction.probability >= threshold, err_msg=kind)
        np.testing.assert_array_equal(written.reshape(prediction.mask.shape), prediction.mask, err_msg=kind)
    assert (pooled == threshold).any()


@pytest.mark.slow
def test_bundle_flip_tta_is_the_predictors(data, tmp_path):
    """``flip_tta`` in the bundle (mirrored token ids from ``ModelTokensd``, a third network input through
    ``prepare_batch``, ``MirrorAveraged`` around the network) writes the masks of the Predictor's ``flip_tta``, on a
    picture and on a volume (mirrored slice batch by slice batch); at that threshold the plain masks differ. A volume
    cut in sagittal slices is refused in one line."""
    kinds = ("png", "series")
    predictor = Predictor(DEFAULT_MODEL, data["ckpt"], device="cpu", flip_tta=True)
    pooled = np.concatenate([predictor.predict(data[k], PROMPT_A).probability.ravel() for k in kinds])
    threshold = float(np.quantile(pooled, 0.5, method="lower"))
    predictor.configure(threshold, "patient", flip_tta=True)
    plain = Predictor(DEFAULT_MODEL, data["ckpt"], device="cpu", threshold=threshold)
    datalist = tmp_path / "inputs.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(data[k])} for k in kinds]}))
    _ok(_infer(data["ckpt"], "--input", str(datalist), "--output_dir", str(tmp_path / "out"), "--prompt", PROMPT_A,
               "--threshold", repr(threshold), "--flip_tta", "True"))
    differs = []
    for kind in kinds:
        written = nib.load(tmp_path / "out" / f"{data[kind].name.split('.')[0]}_mask.nii.gz").get_fdata()
        mask = predictor.predict(data[kind], PROMPT_A).mask
        assert 0 < mask.mean() < 1, kind
        np.testing.assert_array_equal(written.reshape(mask.shape), mask, err_msg=kind)
        differs.append(bool((plain.predict(data[kind], PROMPT_A).mask != mask).any()))
    assert all(differs), differs
    sagittal = tmp_path / "sagittal.nii.gz"  # slices along left-right: mirroring one would flip front and back
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 10, 8)).astype(np.float32),
                             np.diag([3.0, 0.8, 0.8, 1.0])), sagittal)
    result = _infer(data["ckpt"], "--input", str(sagittal), "--output_dir", str(tmp_path / "sag"), "--flip_tta", "True")
    assert result.returncode != 0
    line = next((x for x in result.stdout.splitlines() if x.startswith("ValueError: ")), "")
    assert "sagittal.nii.gz is cut in sagittal slices" in line, result.stdout[-3000:]
    assert not (tmp_path / "sag" / "sagittal_mask.nii.gz").exists()


def test_list_inputs_treats_a_dicom_series_as_one_volume(data):
    assert list_inputs(data["series"]) == [{"image": str(data["series"])}]
    assert {Path(r["image"]).name for r in list_inputs(data["png"].parent)} == {"patient1.png", "patient2.dcm"}


# ---------------------------------------------------------------------------------------- training, evaluation
def _history(run: Path) -> list[dict]:
    """The run's validation records without their wall-clock ``seconds`` (which must be there, and grow)."""
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    seconds = [record.pop("seconds") for record in records]
    assert all(0 < a < b for a, b in zip(seconds, seconds[1:])) and seconds[0] > 0, seconds
    return records


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_train_properties_drive_the_package_trainer(train_data, tmp_path):
    """train.json's MONAI train-workflow properties are the package trainer's parts: setting ``max_epochs`` (as MONAI
    Label's bundle trainer does) sets the run's epochs, ``train_dataset`` is the data it trains on, ``network_def``
    the model it trains, ``train_inferer`` the inferer its step calls."""
    from ignite.engine import Engine
    from monai.bundle import ConfigWorkflow

    from causalclipseg.training.trainer import Trainer

    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "train.json"), workflow_type="train",
                              bundle_root=str(BUNDLE), dataset_dir=str(train_data), output_dir=str(tmp_path / "run"),
                              batch_size=2, progress=False)
    workflow.max_epochs = 3
    workflow.initialize()
    assert workflow.check_properties() == []
    trainer = workflow.trainer
    assert isinstance(trainer, Trainer) and isinstance(trainer, Engine)
    assert trainer.config.epochs == 3 and trainer.total_iterations == 3 * 2  # 4 training records, batch 2
    assert workflow.train_dataset is trainer.train_dataset and len(workflow.train_dataset) == 4
    assert workflow.network_def is trainer.network and workflow.train_inferer is trainer.inferer
    assert trainer.config.data == str(train_data) and trainer.device == torch.device(str(workflow.device))
    assert not (tmp_path / "run" / "train_config.json").exists()  # building the trainer records no run


@pytest.mark.slow
def test_train_then_evaluate_both_protocols(train_data, tmp_path):
    out_dir = tmp_path / "run"
    _ok(_bundle("run", "--config_file", "configs/train.json", "--dataset_dir", str(train_data),
                "--output_dir", str(out_dir), "--max_epochs", "1", "--batch_size", "2", "--progress", "False"))
    assert (out_dir / "best_model.pt").is_file()  # best validation model
    assert _checkpoints(out_dir) == ["last_checkpoint_2.pt"]
    assert {"model", "optimizer"} <= set(torch.load(out_dir / "checkpoints" / "last_checkpoint_2.pt",
                                                     weights_only=True))  # the resumable state: model + optimizer ...
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard
    create_model(DEFAULT_MODEL, checkpoint=out_dir / "best_model.pt")  # the package loads what the bundle saved
    eval_dir = tmp_path / "eval"
    out = _ok(_bundle("run", "--config_file", "['configs/train.json','configs/evaluate.json']",
                      "--dataset_dir", str(train_data), "--output_dir", str(eval_dir),
                      "--ckpt_path", str(out_dir / "best_model.pt"), "--batch_size", "2"))
    assert "per_image Dice" in out and "dataset_level Dice" in out
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert {"per_image/dice", "dataset_level/dice", "per_image/iou", "dataset_level/iou"} <= set(metrics)
    assert (eval_dir / "scores.csv").is_file()
    # the package's evaluation: `causalclipseg evaluate` gives the same numbers on the same split
    from causalclipseg import cli

    summary = tmp_path / "cli_eval.json"
    assert cli.main(["evaluate", "--data", str(train_data), "--split", "test", "--checkpoint",
                     str(out_dir / "best_model.pt"), "--json", str(summary), "--device", "cpu"]) == 0
    expected = json.loads(summary.read_text())
    assert metrics["n_images"] == 2 and {k: expected[k] for k in metrics} == metrics


@pytest.mark.slow
def test_bundle_and_cli_train_are_one_trainer(train_data, tmp_path):
    """The bundle's train.json and ``causalclipseg train`` on the same data with the same seed and knobs: the same run
    config, and the same best model (bit for bit) and validation history."""
    from causalclipseg.training.trainer import TrainConfig, config_changes

    bundle_run, cli_run = tmp_path / "bundle", tmp_path / "cli"
    _ok(_bundle("run", "--config_file", "configs/train.json", "--dataset_dir", str(train_data), "--output_dir",
                str(bundle_run), "--max_epochs", "2", "--batch_size", "2", "--warmup_iterations", "2",
                "--lambda_dice", "0.8", "--lambda_bce", "0.2", "--progress", "False"))
    subprocess.run([sys.executable, "-m", "causalclipseg.cli", "train", "--data", str(train_data), "--output-dir",
                    str(cli_run), "--epochs", "2", "--batch-size", "2", "--warmup-iterations", "2",
                    "--lambda-dice", "0.8", "--lambda-bce", "0.2", "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    cli_config = json.loads((cli_run / "train_config.json").read_text())
    assert (cli_config["lambda_dice"], cli_config["lambda_bce"]) == (0.8, 0.2)
    world_size = cli_config.pop("world_size")
    assert config_changes(json.loads((bundle_run / "train_config.json").read_text()), TrainConfig(**cli_config),
                          world_size) == {}
    bundle_model = torch.load(bundle_run / "best_model.pt", weights_only=True)
    cli_model = torch.load(cli_run / "best_model.pt", weights_only=True)
    assert bundle_model.keys() == cli_model.keys()
    for key, tensor in cli_model.items():
        torch.testing.assert_close(bundle_model[key], tensor, rtol=0, atol=0, msg=key)
    assert _history(bundle_run) == _history(cli_run) and [r["epoch"] for r in _history(cli_run)] == [1, 2]
    assert _checkpoints(bundle_run) == _checkpoints(cli_run) == ["last_checkpoint_4.pt"]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_gpu_train_starts_two_processes_on_cpu(train_data, tmp_path):
    """torchrun with 2 CPU processes (gloo) and DistributedDataParallel: both train their shard to the end, rank 0
    alone validates and writes one checkpoint set; the same command asked for one more epoch (allow_config_change)
    resumes that run in both processes."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}

    def torchrun(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                   str(_free_port()), "-m", "monai.bundle", "run", "--config_file",
                   "['configs/train.json','configs/multi_gpu_train.json']", "--dataset_dir", str(train_data),
                   "--output_dir", str(tmp_path), "--batch_size", "1", "--progress", "False", *args]
        result = subprocess.run(command, cwd=BUNDLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:]
        return result

    result = torchrun("--max_epochs", "1")
    finished = re.findall(r"Trainer - INFO - Engine run finished", result.stdout)
    assert len(finished) == 2, result.stdout[-4000:]  # both ranks trained to the end
    assert (tmp_path / "best_model.pt").is_file()  # rank 0 saved
    assert _checkpoints(tmp_path) == ["last_checkpoint_2.pt"]  # one set: 4 records, 2 per process, batch 1
    assert [r["epoch"] for r in _history(tmp_path)] == [1]
    assert json.loads((tmp_path / "train_config.json").read_text())["world_size"] == 2
    assert len(re.findall(r"epoch 1: validation per-image Dice", result.stdout)) == 1  # on rank 0 only

    result = torchrun("--max_epochs", "2", "--allow_config_change", "True")
    resumed = re.findall(r"resumed from \S+last_checkpoint_2\.pt at epoch 1, iteration 2", result.stdout)
    assert len(resumed) == 2, result.stdout[-4000:]  # both processes continue the run
    assert _checkpoints(tmp_path) == ["last_checkpoint_4.pt"]
    assert [r["epoch"] for r in _history(tmp_path)] == [1, 2]
