"""Contract every blob-store backend passes (file:// and memory:// here; s3:// against a real
S3-compatible server in test_s3.py), plus the index."""

from __future__ import annotations

import hashlib
import uuid

import fsspec
import pytest
import torch

from fedtrain.storage.blobstore import BlobCorrupted, BlobMissing, BlobStore
from fedtrain.storage.index import RunIndex
from fedtrain.storage.runstore import RunStore

CONTRACT_DATA = b"federated" * 1000


def temp_files(store: BlobStore) -> list[str]:
    """Files under the store's tmp/ (``find``: an object store has no empty directories)."""
    return list(store.fs.find(f"{store.root}/tmp"))


def run_contract(store: BlobStore) -> str:
    data = CONTRACT_DATA
    blob = store.put(data)
    assert blob == hashlib.sha256(data).hexdigest()  # content addressed
    assert store.exists(blob) and store.get(blob) == data
    assert store.put(data) == blob  # idempotent
    empty = store.put(b"")
    assert store.get(empty) == b""
    # Writes leave no temp files behind.
    assert temp_files(store) == []
    # Corruption is detected on read, never returned.
    with store.fs.open(store.path(blob), "wb") as f:
        f.write(b"federatex" + data[9:])
    with pytest.raises(BlobCorrupted):
        store.get(blob)
    assert store.put(data) == blob and store.get(blob) == data  # re-put repairs it
    with pytest.raises(BlobMissing):
        store.get("0" * 64)
    store.delete(empty)
    assert not store.exists(empty)
    return blob


@pytest.mark.parametrize(
    "url",
    ["file://{tmp}/blobs", "{tmp}/blobs", "memory://fedtrain-{uid}"],
    ids=["file", "path", "memory"],
)
def test_backend_contract(url, tmp_path):
    store = BlobStore(url.format(tmp=tmp_path, uid=uuid.uuid4().hex))
    blob = run_contract(store)
    # After the contract: the repaired blob is intact and nothing is left in tmp/.
    assert store.get(blob) == CONTRACT_DATA
    assert temp_files(store) == []


def test_run_store_on_memory_backend_round_trips_tensors(tmp_path):
    store = RunStore(tmp_path, url=f"memory://fedtrain-{uuid.uuid4().hex}")
    t = {"w": torch.randn(3, 4), "b": torch.arange(5.0)}
    blob = store.put_tensors(t, {"step": 7})
    back, meta = store.get_tensors(blob)
    assert meta == {"step": 7} and all(torch.equal(back[k], t[k]) for k in t)
    assert not (tmp_path / "blobs").exists()  # really elsewhere
    assert fsspec.filesystem("memory").exists(store.blobs.path(blob))


def test_round_is_committed_only_by_the_commit_transaction(tmp_path):
    index = RunIndex(tmp_path / "index.sqlite")
    index.start_round(1)
    assert index.committed_rounds() == [] and index.metrics() == []
    index.commit_round(1, {"global_blob": "x"}, {"round": 1, "tokens": 10})
    assert index.committed_rounds() == [1]
    assert index.metrics() == [{"round": 1, "tokens": 10}]
    index.start_round(2)
    index.record_update(2, "silo0", blob="b", nbytes=10, codec="int4", valid=False, reason="NaN")
    index.forget_after(1)
    assert [r["round"] for r in index.rounds()] == [1] and index.updates(2) == []
    index.close()
    # Reopening a file written by another schema version is refused with a clear message.
    other = RunIndex(tmp_path / "index.sqlite")
    other.set_meta("schema_version", 99)
    other.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        RunIndex(tmp_path / "index.sqlite")


def test_index_uses_wal(tmp_path):
    index = RunIndex(tmp_path / "i.sqlite")
    assert index.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
