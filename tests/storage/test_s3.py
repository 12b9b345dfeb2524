"""The blob store on ``s3://``, against a real S3-compatible server process (moto's standalone
server on 127.0.0.1): the backend contract, and a run killed mid-commit that resumes from S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtrain.runtime.children import free_port
from fedtrain.storage.blobstore import BlobStore
from tests.storage.test_blobstore import CONTRACT_DATA, run_contract, temp_files
from tests.storage.test_resume import OVERRIDES

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow

BUCKET = "fedtrain-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict[str, str]:
    """A moto S3 server process on an ephemeral port, the env that points clients at it, and
    one bucket; stopped (by PID) at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
                time.sleep(0.2)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_backend_passes_the_blob_store_contract(s3):
    store = BlobStore(f"s3://{BUCKET}/contract-{uuid.uuid4().hex}")
    blob = run_contract(store)
    assert store.get(blob) == CONTRACT_DATA and temp_files(store) == []
    assert store.size(blob) == len(CONTRACT_DATA)


def _simulate(run_dir: Path, url: str, resume: bool = False, kill_at: str | None = None):
    args = [sys.executable, "-m", "fedtrain.cli.main", "simulate", "--quiet"]
    args += ["--run-dir", str(run_dir)]
    if resume:
        args.append("--resume")
    else:
        for o in [*OVERRIDES, f"storage.url={url}"]:
            args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "FEDTRAIN_KILL_AT"}
    if kill_at:
        env["FEDTRAIN_KILL_AT"] = kill_at
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def test_run_on_s3_killed_mid_commit_resumes_to_the_uninterrupted_weights(s3, tmp_path):
    reference = tmp_path / "reference"
    assert _simulate(reference, "").returncode == 0  # the same run on local disk
    url = f"s3://{BUCKET}/run-{uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    killed = _simulate(run_dir, url, kill_at="state_written@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run_dir / "blobs").exists()  # the blobs are in the bucket, not the run dir
    resumed = _simulate(run_dir, url, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (
        load_file(str(run_dir / "model.safetensors")),
        load_file(str(reference / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    import s3fs

    objects = s3fs.S3FileSystem().find(url.removeprefix("s3://"))
    assert objects and not [o for o in objects if "/tmp/" in o]
