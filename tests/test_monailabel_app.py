"""The MONAI Label app (``monailabel_app/``) on a real MONAI Label server, started here on a free loopback port.

The server (``monailabel start_server --app monailabel_app ...``) runs in its own process group with its own
temporary folder, a studies folder written here (a PNG X-ray, a single-slice NIfTI, a NIfTI volume) and a random
tiny checkpoint chosen with ``--conf checkpoint``; it is stopped by its process group id. Requests go through MONAI
Label's own client (``monailabel.client.MONAILabelClient``), with a folder of its own or (as a client on the
server's machine) its default one, the server's temporary folder, and once through the Slicer extension's client. The
random weights make no sensible masks: the tests check the grid, the values, that the prompt reaches the network
(thresholds at the median probability of one prompt, as in ``test_bundle.py``) and the error answers. The last test
fine-tunes from labels saved in the datastore (the active-learning loop) and checks that the server then serves the
fine-tuned weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a real MONAI Label server on loopback

pytest.importorskip("monailabel", reason="MONAI Label is not installed here: pip install -e '.[test,monailabel]'")

import nibabel as nib  # noqa: E402
import torch  # noqa: E402
from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402
from PIL import Image  # noqa: E402

from causalclipseg import DEFAULT_MODEL, create_model  # noqa: E402
from causalclipseg.data.prompts import swap_laterality  # noqa: E402
from causalclipseg.inference.predictor import Predictor  # noqa: E402
from causalclipseg.training.checkpoint import save_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "monailabel_app"
SLICER_MODULE = REPO / "slicer_extension" / "TextPromptSegmentation"
MODEL = "causalclipseg"
PROMPT_A = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
PROMPT_B = "unilateral pulmonary infection, one infected area, upper right lung."
OBLIQUE = np.array([[0.9, 0.3, 0.0, -20.0], [-0.3, 0.9, 0.0, 15.0], [0.0, 0.0, 2.5, 40.0], [0.0, 0.0, 0.0, 1.0]])
START_TIMEOUT = 180  # seconds for the server to answer /info/ (imports and the network; about 15 s here)
REQUEST_TIMEOUT = 120  # seconds for any one request (the official client has no timeout of its own)


# ----------------------------------------------------------------------------------------------- the server
def write_studies(root: Path) -> dict[str, Path]:
    """A studies folder (PNG X-ray 72 rows x 88 columns, single-slice NIfTI, NIfTI volume) and beside it random
    weights of the shipped variant (``checkpoint``) and of ``tiny``, which has the causal module
    (``causal_checkpoint``)."""
    rng = np.random.default_rng(0)
    studies = root / "studies"
    studies.mkdir(parents=True)
    rows, cols = np.mgrid[0:72, 0:88]
    chest = 120 + 60 * np.cos(cols / 88 * 2 * np.pi) * np.sin(rows / 72 * np.pi) + rng.normal(0, 20, (72, 88))
    Image.fromarray(np.clip(chest, 0, 255).astype(np.uint8)).save(studies / "xray1.png")
    nib.save(nib.Nifti1Image(rng.random((48, 40, 1)).astype(np.float32), OBLIQUE), studies / "slice1.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((40, 36, 5)).astype(np.float32), OBLIQUE), studies / "vol1.nii.gz")
    torch.manual_seed(0)
    checkpoint = save_weights(create_model(DEFAULT_MODEL).state_dict(), root / "random_shipped.pt", half=True)
    causal = save_weights(create_model("tiny").state_dict(), root / "random_tiny.pt", half=True)
    return {"studies": studies, "checkpoint": checkpoint, "causal_checkpoint": causal, "xray1": studies / "xray1.png",
            "slice1": studies / "slice1.nii.gz", "vol1": studies / "vol1.nii.gz"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MonaiLabelServer:
    """``monailabel start_server --app monailabel_app`` in its own process group, on a free loopback port.

    Its temporary folder (``TMPDIR``) is ``root/server_tmp``, so uploads and results it leaves behind can be found.
    """

    def __init__(self, root: Path, studies: Path, checkpoint: Path, model: str | None = None) -> None:
        self.root = root
        self.studies = studies
        self.tmpdir = root / "server_tmp"
        self.model_dir = root / "model"
        self.log = root / "server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        script = Path(sys.executable).parent / "monailabel"  # bash: exec $MONAILABEL_PYEXE -m monailabel.main
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "monailabel.main"]
        self.command = [*launcher, "start_server", "--app", "monailabel_app", "--studies", str(studies),
                        "--host", "127.0.0.1", "--port", str(self.port), "--conf", "checkpoint", str(checkpoint),
                        "--conf", "model_dir", str(self.model_dir), *(("--conf", "model", model) if model else ())]
        self.env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "TMPDIR": str(self.tmpdir),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONWARNINGS": "ignore"}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait (bounded) until ``/info/`` answers.

        Raises:
            RuntimeError: if the server exits or does not answer in time (with the end of its log).
        """
        import requests

        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not answer /info/ within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=20)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def client(self, tmpdir: Path) -> MONAILabelClient:
        tmpdir.mkdir(parents=True, exist_ok=True)
        return MONAILabelClient(self.url, tmpdir=str(tmpdir))


@pytest.fixture(scope="module")
def request_timeout() -> Iterator[None]:
    """Bound every socket operation of the official client (it sets no timeout itself)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(REQUEST_TIMEOUT)
    yield
    socket.setdefaulttimeout(previous)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_studies(tmp_path_factory.mktemp("monailabel_app"))


@pytest.fixture(scope="module")
def server(data, request_timeout) -> Iterator[MonaiLabelServer]:
    srv = MonaiLabelServer(data["studies"].parent, data["studies"], data["checkpoint"])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def median_threshold(checkpoint: Path, image: Path, prompt: str) -> float:
    """The median lesion probability of ``image`` under ``prompt``, computed here with the package's path."""
    return float(np.median(Predictor(DEFAULT_MODEL, checkpoint, device="cpu").predict(image, prompt).probability))


def png_label(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


# -------------------------------------------------------------------------------------------------- the tests
def test_info_shows_the_prompt_option_and_both_tasks(server):
    info = server.client(server.root / "c_info").info()
    model = info["models"][MODEL]
    bundle = json.loads((REPO / "bundle" / "configs" / "inference.json").read_text())
    assert model["config"]["prompt"] == bundle["prompt"]
    assert model["config"]["threshold"] == bundle["threshold"]
    assert model["labels"] == {"lesion": 1} and model["type"] == "segmentation"
    assert info["trainers"][MODEL]["config"]["prompt"] == bundle["prompt"]
    assert info["datastore"]["total"] == 3


def test_png_label_lies_on_the_picture_and_the_prompt_reaches_the_network(server, data):
    client = server.client(server.root / "c_png")
    threshold = median_threshold(data["checkpoint"], data["xray1"], PROMPT_A)
    masks = {}
    for prompt in (PROMPT_A, PROMPT_B):
        label, params = client.infer(MODEL, "xray1", {"prompt": prompt, "threshold": threshold})
        assert label.endswith(".png") and params["prompt"] == prompt and params["weights"] == data["checkpoint"].name
        masks[prompt] = png_label(label)
        assert masks[prompt].shape == png_label(str(data["xray1"])).shape == (72, 88)  # rows x columns
        assert set(np.unique(masks[prompt])) <= {0, 1}
    assert 0 < masks[PROMPT_A].mean() < 1  # prompt A's mask is neither empty nor full at its median
    assert (masks[PROMPT_A] != masks[PROMPT_B]).any()  # the other prompt changes the mask


def test_uploaded_png_and_nifti_result_extension(server, data):
    client = server.client(server.root / "c_upload")
    label, params = client.infer(MODEL, "", {"prompt": PROMPT_B}, file=str(data["xray1"]))
    assert png_label(label).shape == (72, 88) and params["prompt"] == PROMPT_B
    label, _ = client.infer(MODEL, "", {"prompt": PROMPT_B, "result_extension": ".nii.gz"}, file=str(data["xray1"]))
    assert nib.load(label).shape == (88, 72)  # MONAI's axis order: x (columns) first


@pytest.mark.parametrize("name, how", [("slice1", "id"), ("vol1", "id"), ("vol1", "upload")])
def test_nifti_labels_keep_the_input_grid(server, data, name, how):
    client = server.client(server.root / f"c_{name}_{how}")
    threshold = median_threshold(data["checkpoint"], data[name], PROMPT_A)
    image_id, file = (name, None) if how == "id" else ("", str(data[name]))
    label, params = client.infer(MODEL, image_id, {"prompt": PROMPT_A, "threshold": threshold}, file=file)
    result, source = nib.load(label), nib.load(data[name])
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    values = np.asarray(result.dataobj)
    assert set(np.unique(values)) <= {0, 1} and 0 < values.mean() < 1
    assert params["prompt"] == PROMPT_A


def test_volume_as_nrrd(server, data):
    import nrrd

    label, _ = server.client(server.root / "c_nrrd").infer(MODEL, "vol1", {"prompt": PROMPT_A,
                                                                            "result_extension": ".nrrd"})
    values, header = nrrd.read(label)
    assert label.endswith(".nrrd") and values.shape == (40, 36, 5) and set(np.unique(values)) <= {0, 1}


def _answers_the_maps_predict_explain_writes(server: MonaiLabelServer, model: str, checkpoint: Path,
                                             data: dict[str, Path]) -> None:
    """``result_map`` each of the served model's explanation maps, which ``/info/`` lists: the answer's file is that
    map, float32 in [0, 1] on the request image's grid, with the values of ``causalclipseg predict --explain`` (a
    volume by id, a picture uploaded). A causal mask is asked for with the other prompt: it does not depend on the
    prompt."""
    client = server.client(server.root / "c_explain")
    predictor = Predictor(model, checkpoint, device="cpu")
    maps = predictor.model.explanation_maps
    assert client.info()["models"][MODEL]["config"]["result_map"] == ["mask", *maps]
    for name, how in (("vol1", "id"), ("xray1", "upload")):
        expected = predictor.predict(data[name], PROMPT_A, explain=True).maps
        image_id, file = (name, None) if how == "id" else ("", str(data[name]))
        for result_map in maps:
            prompt, values = PROMPT_B if result_map == "causal_mask" else PROMPT_A, expected[result_map]
            label, params = client.infer(MODEL, image_id, {"prompt": prompt, "result_map": result_map}, file=file)
            result = nib.load(label)
            assert label.endswith(".nii.gz") and result.get_data_dtype() == np.float32, (name, result_map)
            if name == "vol1":
                assert result.shape == nib.load(data[name]).shape
                np.testing.assert_allclose(result.affine, nib.load(data[name]).affine, atol=1e-5)
            else:
                assert result.shape[:2] == (88, 72)  # the picture's columns and rows, MONAI's axis order
            answer = np.asarray(result.dataobj).reshape(values.shape)
            assert 0.0 <= answer.min() and answer.max() <= 1.0 and answer.std() > 0
            np.testing.assert_allclose(answer, values, rtol=0, atol=1e-5, err_msg=f"{name} {result_map}")
            assert params["result_map"] == result_map and params["prompt"] == prompt
            np.testing.assert_allclose(params["value_range"], [answer.min(), answer.max()], atol=1e-6)
    _, params = client.infer(MODEL, "xray1", {"prompt": PROMPT_A})
    assert params["result_map"] == "mask" and params["label_values"] == {"background": 0, "lesion": 1}


def test_result_map_answers_the_probability_predict_explain_writes(server, data):
    """The shipped variant has no causal module: its one map is the probability (a causal mask asked for: HTTP 400,
    ``test_bad_requests_answer_4xx_with_one_line``)."""
    _answers_the_maps_predict_explain_writes(server, DEFAULT_MODEL, data["checkpoint"], data)


def test_result_map_of_a_causal_model_answers_its_causal_mask_too(data, request_timeout, tmp_path_factory):
    """A server of ``tiny`` (``--conf model tiny``, with the causal module): the probability and the causal mask."""
    srv = MonaiLabelServer(tmp_path_factory.mktemp("causal_server"), data["studies"], data["causal_checkpoint"],
                           model="tiny")
    srv.start()
    try:
        _answers_the_maps_predict_explain_writes(srv, "tiny", data["causal_checkpoint"], data)
    finally:
        srv.stop()


def test_flip_tta_answers_what_predict_flip_tta_gives(server, data):
    """``flip_tta`` per request (``/info`` offers the bundle's default, off): the answer's probability map is the
    one ``causalclipseg predict --flip-tta --explain`` writes, which differs from the plain one."""
    client = server.client(server.root / "c_flip")
    assert client.info()["models"][MODEL]["config"]["flip_tta"] is False
    maps = {flip: Predictor(DEFAULT_MODEL, data["checkpoint"], device="cpu", flip_tta=flip).predict(
        data["xray1"], PROMPT_A, explain=True).maps["probability"] for flip in (False, True)}
    for flip in (True, "true", False):
        label, params = client.infer(MODEL, "xray1", {"prompt": PROMPT_A, "result_map": "probability",
                                                      "flip_tta": flip})
        expected = maps[str(flip).lower() == "true"]
        answer = np.asarray(nib.load(label).dataobj).reshape(expected.shape)
        np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-5, err_msg=str(flip))
    assert np.abs(maps[True] - maps[False]).max() > 1e-4


def test_flip_tta_refuses_a_volume_cut_in_sagittal_slices(server):
    client = server.client(server.root / "c_flip_sagittal")
    sagittal = server.root / "sagittal.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 10, 8)).astype(np.float32),
                             np.diag([3.0, 0.8, 0.8, 1.0])), sagittal)
    with pytest.raises(MONAILabelClientException) as info:
        client.infer(MODEL, "", {"prompt": PROMPT_A, "flip_tta": True}, file=str(sagittal))
    assert "Status: 400;" in info.value.msg and "is cut in sagittal slices" in info.value.msg, info.value.msg
    label, _ = client.infer(MODEL, "", {"prompt": PROMPT_A}, file=str(sagittal))  # without flip TTA: segmented
    assert nib.load(label).shape == (12, 10, 8)


def _label_on_grid(label: str, source: Path) -> np.ndarray:
    """The label's values, checked to lie on ``source``'s grid (a PNG's rows and columns, a NIfTI's shape and
    affine) with values in {0, 1}."""
    if source.suffix == ".png":
        values = png_label(label)
        assert label.endswith(".png") and values.shape == png_label(str(source)).shape
    else:
        result, image = nib.load(label), nib.load(source)
        assert result.shape == image.shape and np.allclose(result.affine, image.affine)
        values = np.asarray(result.dataobj)
    assert set(np.unique(values)) <= {0, 1}
    return values


def test_results_survive_a_client_sharing_the_server_temp_folder(server, data, monkeypatch):
    """12 requests in a row through MONAI Label's client with its default temporary folder, on the server's machine.

    The client saves each label as ``<its temp folder>/<the server's file name>`` (``tempfile.tempdir``, else
    ``/tmp``) and the server deletes its own file in a background task after answering; with one temporary folder
    for both (``tempfile.tempdir`` set to the server's ``TMPDIR``, as when both run on one machine) the server's
    clean-up must not delete the client's copy. The app writes its labels in ``model_dir/results``, which is empty
    once MONAI Label's clean-up (a background task that runs after each answer is sent) has run.
    """
    thresholds = {name: median_threshold(data["checkpoint"], data[name], PROMPT_A)
                  for name in ("xray1", "slice1", "vol1")}
    monkeypatch.setattr(tempfile, "tempdir", str(server.tmpdir))  # what MONAILabelClient's default tmpdir reads
    client = MONAILabelClient(server.url)
    first: dict[tuple[str, str], np.ndarray] = {}
    results: list[tuple[str, str, np.ndarray]] = []
    for i in range(12):
        name, prompt = ("xray1", "slice1", "vol1")[i % 3], (PROMPT_A, PROMPT_B)[i // 3 % 2]
        label, params = client.infer(MODEL, name, {"prompt": prompt, "threshold": thresholds[name]})
        assert Path(label).parent == server.tmpdir and params["prompt"] == prompt
        values = _label_on_grid(label, data[name])
        np.testing.assert_array_equal(values, first.setdefault((name, prompt), values))
        results.append((label, name, values))
    assert len({label for label, _, _ in results}) == 12
    app_folder = server.model_dir / "results"
    deadline = time.monotonic() + 10  # bounded wait for the background deletions
    while any(app_folder.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert app_folder.is_dir() and not any(app_folder.iterdir()), "the app left label files behind"
    for label, name, values in results:  # the client's files are still there after the server's clean-up
        np.testing.assert_array_equal(_label_on_grid(label, data[name]), values)
        Path(label).unlink()


@pytest.mark.parametrize("params, image, status, message", [
    ({"prompt": "   "}, "xray1", 400, "prompt must contain text"),
    ({"prompt": 7}, "xray1", 400, "prompt must be a str"),
    ({"prompt": PROMPT_A, "threshold": 2}, "xray1", 400, "threshold must be a number in (0, 1)"),
    ({"prompt": PROMPT_A, "result_extension": ".jpg"}, "xray1", 400, "result_extension must be one of"),
    ({"prompt": PROMPT_A, "result_map": "heatmap"}, "xray1", 400,
     "result_map must be one of mask, probability, causal_mask, got 'heatmap'"),
    ({"prompt": PROMPT_A, "result_map": "causal_mask"}, "xray1", 400,
     f"result_map causal_mask needs a model with a causal module; the served '{DEFAULT_MODEL}' has none: ask for "
     f"mask, probability"),
    ({"prompt": PROMPT_A, "result_map": "probability", "result_extension": ".png"}, "xray1", 400,
     "result_map probability is a float32 map, which a PNG cannot hold"),
    ({"prompt": PROMPT_A, "flip_tta": "maybe"}, "xray1", 400, "flip_tta must be true or false, got 'maybe'"),
    ({"prompt": PROMPT_A}, "upload:broken.png", 400, "cannot read the uploaded .png image"),
    ({"prompt": PROMPT_A}, "nosuchimage", 404, "'nosuchimage' is neither an image id of the datastore"),
])
def test_bad_requests_answer_4xx_with_one_line(server, params, image, status, message):
    client = server.client(server.root / "c_bad")
    file = None
    if image.startswith("upload:"):
        file = server.root / image.split(":", 1)[1]
        file.write_text("this is not an image")
        image = ""
    before = set(server.tmpdir.iterdir())
    with pytest.raises(MONAILabelClientException) as info:
        client.infer(MODEL, image, params, file=str(file) if file else None)
    text = info.value.msg
    assert f"Status: {status};" in text and message in text, text
    detail = json.loads(text.split("Response: ", 1)[1])["detail"]
    assert "\n" not in detail and "Traceback" not in detail
    assert not set(server.tmpdir.iterdir()) - before  # the upload was removed although the request failed
    assert client.info()["models"][MODEL]  # the server is still up


def test_unknown_model_is_404(server, data):
    import requests

    with open(data["xray1"], "rb") as f:
        answer = requests.post(f"{server.url}/infer/nosuchmodel", files={"file": ("x.png", f)},
                               data={"params": "{}"}, timeout=REQUEST_TIMEOUT)
    assert answer.status_code == 404 and "no model 'nosuchmodel'" in answer.json()["detail"]


def test_default_conf_serves_the_bundle_weights_in_process(qata_root, tmp_path):
    """Without ``--conf checkpoint`` the app serves ``bundle/models/model.pt`` (a copy of the package's weights);
    on five QaTa-COV19 validation images with their own captions (the viewer's side: ``prompt_side`` viewer) the
    shipped model finds the lesions (mean Dice; the model's validation mean is 0.77), and the same captions worded
    with the patient's sides (the default) give the same labels. Through the app object, as
    ``monailabel.interfaces.utils.app`` runs it."""
    from monailabel.interfaces.utils.app import app_instance

    images = sorted((qata_root / "images" / "valid" / "images").glob("*.png"))[:5]
    captions = {r["image_path"]: r["caption"]
                for r in json.loads((qata_root / "prompts" / "annotation.json").read_text())["valid"]}
    (tmp_path / "studies").mkdir()
    for i, image in enumerate(images):
        (tmp_path / "studies" / f"x{i}.png").write_bytes(image.read_bytes())
    app = app_instance(app_dir=str(APP), studies=str(tmp_path / "studies"), conf={"model_dir": str(tmp_path / "m")})
    served = Path(app.infer_task.get_path())
    assert served == (REPO / "bundle" / "models" / "model.pt").resolve()
    assert served.read_bytes() == (REPO / "causalclipseg" / "weights" / "causalclipseg_qata.pt").read_bytes()
    assert app.info()["models"][MODEL]["config"]["prompt_side"] == ["patient", "viewer"]
    dice = []
    for i, image in enumerate(images):
        caption = captions[f"mask_{image.name}"]
        result = app.infer({"model": MODEL, "image": f"x{i}", "prompt": caption, "prompt_side": "viewer"})
        mask = png_label(result["file"]) > 0
        Path(result["file"]).unlink()
        patient = app.infer({"model": MODEL, "image": f"x{i}", "prompt": swap_laterality(caption)})
        assert patient["params"]["prompt_side"] == "patient"
        assert np.array_equal(png_label(patient["file"]) > 0, mask)
        Path(patient["file"]).unlink()
        truth = png_label(str(image.parent.parent / "masks" / f"mask_{image.name}")) > 0
        assert mask.shape == truth.shape and result["params"]["weights"] == served.name
        dice.append(2 * (mask & truth).sum() / max(1, mask.sum() + truth.sum()))
    print(f"Dice of the shipped weights served by the app: {np.round(dice, 3)}")
    assert np.mean(dice) > 0.6


def test_slicer_extension_client_against_the_real_server(server, tmp_path):
    sys.path.insert(0, str(SLICER_MODULE))
    try:
        from TextPromptSegmentationLib import monailabel_client, volume_io
    finally:
        sys.path.remove(str(SLICER_MODULE))
    assert monailabel_client.available_models(monailabel_client.info(server.url)) == [MODEL]
    rng = np.random.default_rng(3)
    shape = (3, 40, 48)  # (K, J, I) as Slicer holds a volume
    image = volume_io.write_volume(tmp_path / "input.nii.gz", rng.random(shape).astype(np.float32), OBLIQUE)
    result = monailabel_client.infer(server.url, MODEL, image, {"prompt": PROMPT_A, "device": "auto",
                                                                "threshold": 0.5}, tmp_path / "out", timeout=120)
    values, matrix = volume_io.read_volume(result)
    assert volume_io.same_grid(values.shape, matrix, shape, OBLIQUE) and set(np.unique(values)) <= {0, 1}
    with pytest.raises(monailabel_client.ServerError, match=r"HTTP 400 Bad Request: prompt must contain text"):
        monailabel_client.infer(server.url, MODEL, image, {"prompt": ""}, tmp_path / "out2", timeout=120)


@pytest.mark.slow
def test_train_from_datastore_labels_then_serve_the_fine_tuned_weights(server, data):
    """Labels saved as Slicer would (no text) and with a prompt; one epoch through the server's train task. The
    hold-out puts xray1 aside (its id hashes first); learning from vol1's slices at this learning rate, the served
    random weights' partial mask on xray1 (per-image Dice 0.12) gives way to a larger one (0.25): published."""
    client = server.client(server.root / "c_train")
    label = np.zeros((72, 88), np.uint8)
    label[20:50, 10:40] = 1
    Image.fromarray(label).save(server.root / "xray1_label.png")
    volume = nib.load(data["vol1"])
    label3d = np.zeros(volume.shape, np.uint8)
    label3d[5:25, 4:20, 1:3] = 1
    nib.save(nib.Nifti1Image(label3d, volume.affine), server.root / "vol1_label.nii.gz")
    client.save_label("xray1", str(server.root / "xray1_label.png"), tag="final", params={"prompt": PROMPT_B})
    client.save_label("vol1", str(server.root / "vol1_label.nii.gz"), tag="final")  # as Slicer saves: no text

    client.train_start(MODEL, {"max_epochs": 1, "batch_size": 1, "max_train": 2, "min_labels": 2, "lr": 0.01,
                               "augment": False})
    deadline = time.monotonic() + 300
    status = {}
    while time.monotonic() < deadline:
        time.sleep(2)
        status = client.train_status()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            break
    assert status.get("status") == "DONE", (status, server.log_tail())
    stats = client.info()["train_stats"][MODEL]
    assert stats["labelled_images"] == 2 and stats["epochs"] == 1
    assert stats["held_out_images"] == ["xray1"] and stats["training_images"] == 1
    scores = stats["held_out_scores"]  # both weights scored on the held-out pairs
    assert scores["served"]["n_images"] == scores["fine_tuned"]["n_images"] == stats["validation_items"] == 1
    assert scores["fine_tuned"]["per_image/dice"] > scores["served"]["per_image/dice"], stats
    assert stats["result"].startswith("published") and stats["serving"] == stats["published"]
    assert stats["prompts_from"] == {"label info": 1, "label params": 0, "image info": 0, "default": 1}
    assert stats["started_from"] == str(data["checkpoint"])
    published = Path(stats["published"])
    assert published.is_file() and published.parent == server.model_dir
    datalist = json.loads((Path(stats["run_dir"]) / "datalist.json").read_text())
    assert {Path(r["image"]).name.split("_z")[0] for r in datalist["validation"]} == {"xray1"}
    assert {Path(r["image"]).name.split("_z")[0] for r in datalist["training"]} == {"vol1"}
    prompts = {Path(r["image"]).name.split("_z")[0]: r["prompt"] for r in datalist["training"] + datalist["validation"]}
    assert prompts["xray1"] == PROMPT_B and prompts["vol1"] == client.info()["trainers"][MODEL]["config"]["prompt"]
    assert datalist["prompt_side"] == "patient"  # users' prompts; the engine translates them to the model's
    _, params = client.infer(MODEL, "xray1", {"prompt": PROMPT_A})
    assert params["weights"] == published.name  # the next request is served by the fine-tuned weights
