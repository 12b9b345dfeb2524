"""Codec registry: a new codec is one file plus one line here."""

from __future__ import annotations

import torch

from fedtrain.transport.codecs.base import Codec
from fedtrain.transport.codecs.bf16 import Bf16Codec
from fedtrain.transport.codecs.code8 import Code8Codec
from fedtrain.transport.codecs.fp4 import Fp4Codec
from fedtrain.transport.codecs.fp32 import Fp32Codec
from fedtrain.transport.codecs.int4 import Int4Codec
from fedtrain.transport.codecs.int8 import Int8Codec
from fedtrain.transport.codecs.sign1 import Sign1Codec
from fedtrain.transport.codecs.topk import TopK2Codec, TopK4Codec, TopKCodec

__all__ = ["CODECS", "Codec", "TopKCodec", "get_codec", "is_sparse"]

CODECS: dict[str, type[Codec]] = {
    "fp32": Fp32Codec,
    "bf16": Bf16Codec,
    "int8": Int8Codec,
    "int4": Int4Codec,
    "fp4-e2m1": Fp4Codec,
    "sign1": Sign1Codec,
    "topk-int2": TopK2Codec,
    "topk-int4": TopK4Codec,
    "code8": Code8Codec,  # internal: zeroth-order one-byte codes
}


def get_codec(
    name: str,
    block_size: int = 64,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    keep: int = 0,
) -> Codec:
    """Instantiate the codec registered as ``name``; a sparse one keeps ``keep`` values per
    chunk of ``block_size``."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {sorted(CODECS)}") from None
    if issubclass(cls, TopKCodec):
        return cls(block_size=block_size, stochastic=stochastic, generator=generator, keep=keep)
    return cls(block_size=block_size, stochastic=stochastic, generator=generator)


def is_sparse(name: str) -> bool:
    """Whether codec ``name`` keeps a subset of values (needs ``keep`` and error feedback)."""
    cls = CODECS.get(name)
    return cls is not None and issubclass(cls, TopKCodec)
