"""The MONAI Label app under load: 32 concurrent ``/infer`` requests on loopback (issue 6, item 3).

One real server (see ``test_monailabel_app.py``), warmed up with one request per input kind; then 32 requests from
32 threads through MONAI Label's client (PNG by datastore id, PNG uploaded, NIfTI volume by id; two prompts), each
compared with the answer the same request got alone; then the server's memory, its temporary folder and the studies
folder; then malformed requests (4xx with a message) and ``/info`` afterwards. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a real MONAI Label server under load

pytest.importorskip("monailabel", reason="MONAI Label is not installed here: pip install -e '.[test,monailabel]'")

import nibabel as nib  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402

from tests.test_monailabel_app import (  # noqa: E402
    MODEL,
    PROMPT_A,
    PROMPT_B,
    REQUEST_TIMEOUT,
    MonaiLabelServer,
    median_threshold,
    png_label,
    request_timeout,  # noqa: F401 - a fixture the server fixture uses
    write_studies,
)

N_REQUESTS = 32
LOAD_TIMEOUT = 120  # seconds for all 32 answers
RSS_TOLERANCE = 0.20


@pytest.fixture(scope="module")
def server(tmp_path_factory, request_timeout) -> MonaiLabelServer:  # noqa: F811 - the imported fixture
    data = write_studies(tmp_path_factory.mktemp("monailabel_load"))
    srv = MonaiLabelServer(data["studies"].parent, data["studies"], data["checkpoint"])
    srv.data = data
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _read(path: str) -> np.ndarray:
    return png_label(path) if path.endswith(".png") else np.asarray(nib.load(path).dataobj)


def _no_new_files(folder: Path, before: set[str], wait: float = 10.0) -> set[str]:
    """Files in ``folder`` that were not in ``before``, after waiting (bounded) for background deletions."""
    deadline = time.monotonic() + wait
    while (new := _files(folder) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return new


def test_32_concurrent_requests_then_memory_temp_files_and_malformed_requests(server, tmp_path):
    data = server.data
    thresholds = {name: median_threshold(data["checkpoint"], data[name], PROMPT_A) for name in ("xray1", "vol1")}
    kinds = {"png_id": ("xray1", None), "png_upload": ("", str(data["xray1"])), "volume_id": ("vol1", None)}

    def infer(job: tuple[int, str, str]) -> tuple[np.ndarray, dict]:
        index, kind, prompt = job
        image_id, file = kinds[kind]
        threshold = thresholds["vol1" if kind == "volume_id" else "xray1"]
        client = server.client(tmp_path / f"client{index}")
        label, params = client.infer(MODEL, image_id, {"prompt": prompt, "threshold": threshold}, file=file)
        return _read(label), params

    # warm-up: each kind and prompt once, alone; these answers are the reference for the concurrent ones
    reference = {(kind, prompt): infer((100 + i, kind, prompt))[0]
                 for i, (kind, prompt) in enumerate((k, p) for k in kinds for p in (PROMPT_A, PROMPT_B))}
    assert (reference["png_id", PROMPT_A] != reference["png_id", PROMPT_B]).any()
    process = psutil.Process(server.process.pid)
    rss_before = process.memory_info().rss
    temp_before, studies_before = _files(server.tmpdir), _files(server.studies)

    jobs = [(i, list(kinds)[i % 3], (PROMPT_A, PROMPT_B)[i // 3 % 2]) for i in range(N_REQUESTS)]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=N_REQUESTS) as pool:
        results = list(pool.map(infer, jobs, timeout=LOAD_TIMEOUT))
    seconds = time.monotonic() - start
    assert seconds < LOAD_TIMEOUT
    for (_, kind, prompt), (mask, params) in zip(jobs, results, strict=True):
        assert params["prompt"] == prompt  # no request got another's prompt
        np.testing.assert_array_equal(mask, reference[kind, prompt])  # each answer equals the one it got alone
        assert set(np.unique(mask)) <= {0, 1}

    rss_after = process.memory_info().rss
    print(f"\n{N_REQUESTS} concurrent requests in {seconds:.1f} s; server RSS {rss_before / 2**20:.0f} MiB before, "
          f"{rss_after / 2**20:.0f} MiB after")
    assert abs(rss_after - rss_before) <= RSS_TOLERANCE * rss_before, (rss_before, rss_after)
    assert not _no_new_files(server.tmpdir, temp_before), "uploads or results left in the server's temp folder"
    assert not _no_new_files(server.studies, studies_before), "files left in the studies folder"

    # malformed requests: 4xx with a one-line message, nothing left behind, the server still answers
    malformed = [
        ({"params": json.dumps({"prompt": ""})}, {"file": ("xray.png", data["xray1"].read_bytes())}, 400,
         "prompt must contain text"),
        ({"params": json.dumps({"prompt": PROMPT_A})}, {"file": ("scan.nii.gz", b"not a nifti")}, 400,
         "cannot read the uploaded .nii.gz image"),
        ({"params": json.dumps({"prompt": PROMPT_A, "device": "tpu"})}, {"file": ("x.png", b"x")}, 400,
         "device must be auto, cpu or cuda"),
    ]
    for form, files, status, message in malformed:
        answer = requests.post(f"{server.url}/infer/{MODEL}", data=form, files=files, timeout=REQUEST_TIMEOUT)
        assert answer.status_code == status and message in answer.json()["detail"], answer.text
        assert "\n" not in answer.json()["detail"]
    assert requests.get(f"{server.url}/info/", timeout=REQUEST_TIMEOUT).json()["models"][MODEL]
    assert not _no_new_files(server.tmpdir, temp_before), "a failed request left its upload behind"
    assert server.process.poll() is None
