"""A safetensors file as a stream of chunks taken from the tensors' own memory.

``safetensors.torch.save`` builds the whole file in memory (a second copy of every tensor);
:func:`safetensors_chunks` yields the same bytes — the 8-byte header length, the JSON header
padded with spaces to 8 bytes, then each tensor's bytes in safetensors' order (widest dtype
first, then by name) — so a store can hash and write a model-sized file holding no copy of it.
The bytes equal ``save``'s (tested), so blob ids do not depend on which wrote them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import torch

__all__ = ["safetensors_chunks"]

_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    # name in the header, and rank in safetensors' order (its dtype enum, widest first)
    torch.int64: ("I64", 0),
    torch.float64: ("F64", 1),
    torch.float32: ("F32", 2),
    torch.int32: ("I32", 3),
    torch.bfloat16: ("BF16", 4),
    torch.float16: ("F16", 5),
    torch.int16: ("I16", 6),
    torch.int8: ("I8", 7),
    torch.uint8: ("U8", 8),
    torch.bool: ("BOOL", 9),
}


def safetensors_chunks(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Iterator[bytes | memoryview]:
    """The safetensors serialisation of ``tensors`` (CPU, any layout), chunk by chunk.

    A non-contiguous tensor is copied (one tensor at a time); contiguous ones are not.
    """
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be streamed to safetensors")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: tensor on {t.device}, expected cpu")
    order = sorted(tensors, key=lambda n: (_DTYPES[tensors[n].dtype][1], n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype][0],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    yield len(head).to_bytes(8, "little") + head
    for name in order:
        t = tensors[name].detach()
        if t.numel() == 0:
            continue
        flat = t.contiguous().reshape(-1)
        yield memoryview(flat.view(torch.uint8).numpy().data)
