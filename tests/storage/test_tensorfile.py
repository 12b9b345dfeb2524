"""Tensor blobs streamed from the tensors' memory: safetensors' own bytes, the same blob id."""

import json

import pytest
import torch
from safetensors.torch import load, save

from fedtrain.storage.blobstore import BlobStore
from fedtrain.storage.tensorfile import safetensors_chunks

CASES = [
    {"b": torch.randn(3), "a": torch.randn(2, 2)},
    {
        "i64": torch.zeros(1, dtype=torch.int64),
        "f64": torch.ones(2, dtype=torch.float64),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(3).half(),
        "i32": torch.tensor([1, 2], dtype=torch.int32),
        "i16": torch.tensor([1], dtype=torch.int16),
        "i8": torch.tensor([-1], dtype=torch.int8),
        "u8": torch.tensor([1], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.0),
    },
    {"transposed": torch.randn(4, 5).t()},
    {},
]


@pytest.mark.parametrize("tensors", CASES)
@pytest.mark.parametrize("meta", [None, {"meta": json.dumps({"é": 'a\nb"c'})}])
def test_chunks_are_the_bytes_safetensors_save_writes(tensors, meta):
    chunks = b"".join(bytes(c) for c in safetensors_chunks(tensors, meta))
    assert chunks == save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    for k, v in load(chunks).items():
        assert torch.equal(v, tensors[k])


def test_unsupported_dtype_is_refused_by_name():
    with pytest.raises(TypeError, match="z: dtype torch.complex64"):
        list(safetensors_chunks({"z": torch.zeros(2, dtype=torch.complex64)}))


def test_put_chunks_ids_dedupe_and_repair(tmp_path):
    store = BlobStore(f"file://{tmp_path}/blobs")
    data = bytes(range(256)) * 1000
    blob = store.put_chunks([data[:10], memoryview(data)[10:5000], bytearray(data[5000:])])
    assert blob == store.put(data) and store.get(blob) == data
    with open(store.path(blob), "r+b") as f:  # a corrupted copy is replaced, not trusted
        f.write(b"\xff")
    assert store.put_chunks([data]) == blob and store.get(blob) == data
    assert store.fs.ls(f"{store.root}/tmp") == []
