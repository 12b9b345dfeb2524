"""Fault injection: make a silo crash, stall, lose or falsify its reply at a chosen round.

A fault is written ``KIND@SILO:ROUND[=VALUE]`` (ROUND ``*`` = every round), e.g. ``nan@silo1:2``,
``delay@silo0:3=30``, ``scale@silo5:*=-10``. Simulations take them from ``[faults] inject`` in the
run config (plus seeded random ``drop_rate`` / ``corrupt_rate``); a deployed silo takes them from
the ``FEDTRAIN_FAULTS`` environment variable of ``fedtrain client`` (comma-separated) — a test
hook, like ``FEDTRAIN_KILL_AT`` for the coordinator's store.

Kinds, by what the coordinator sees:

- lost replies: ``kill`` (the silo dies: in simulation its reply fails at once; deployed, the
  trainer process is SIGKILLed), ``drop`` (the reply never arrives in its round; deployed, it
  is held past the round's deadline), ``delay`` (VALUE seconds later).
- malformed bytes: ``corrupt`` (one body byte flipped), ``truncate`` (half the bytes),
  ``oversize`` (a well-formed payload with VALUE extra float32 values, default 2^22),
  ``bad_signature`` (last signature byte flipped), ``unsigned`` (re-encoded without signature).
- wrong content, validly signed by the silo itself: ``nan``, ``inf``, ``wrong_shape``,
  ``wrong_dtype`` (float64 values), ``wrong_keys`` (one parameter renamed), ``replay`` (its
  previous round's payload), ``duplicate`` (the same reply sent twice; simulation only: Flower
  carries exactly one reply per message), ``impersonate`` (another silo's signed payload from
  this round; deployed, through a directory the silos share, :mod:`fedtrain.client.inject`),
  and the Byzantine ``scale`` (update times VALUE, default -10) and ``flip`` (update times -1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.transport.payload import decode_payload, encode_payload, read_header

__all__ = ["FAULT_KINDS", "Fault", "FaultPlan", "parse_fault", "tamper"]

FAULT_KINDS = (
    "kill",
    "drop",
    "delay",
    "corrupt",
    "truncate",
    "oversize",
    "bad_signature",
    "unsigned",
    "nan",
    "inf",
    "wrong_shape",
    "wrong_dtype",
    "wrong_keys",
    "replay",
    "duplicate",
    "impersonate",
    "scale",
    "flip",
)
_DEFAULT_VALUE = {"delay": 5.0, "oversize": float(1 << 22), "scale": -10.0}


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    silo: str
    round: int
    """Round it fires in; 0 = every round."""
    value: float = 0.0

    def __str__(self) -> str:
        rnd = "*" if self.round == 0 else str(self.round)
        return f"{self.kind}@{self.silo}:{rnd}" + (f"={self.value:g}" if self.value else "")


def parse_fault(spec: str) -> Fault:
    """Parse ``KIND@SILO:ROUND[=VALUE]``; ValueError naming what is wrong."""
    text = spec.strip()
    head, _, value = text.partition("=")
    kind, at, where = head.partition("@")
    silo, colon, rnd = where.partition(":")
    if not (at and colon and silo and rnd):
        raise ValueError(f"fault {spec!r}: expected KIND@SILO:ROUND[=VALUE], e.g. nan@silo1:2")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault {spec!r}: unknown kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
    if rnd == "*":
        n = 0
    elif rnd.isdigit() and int(rnd) >= 1:
        n = int(rnd)
    else:
        raise ValueError(f"fault {spec!r}: ROUND must be an integer >= 1 or '*'")
    try:
        v = float(value) if value else _DEFAULT_VALUE.get(kind, 0.0)
    except ValueError:
        raise ValueError(f"fault {spec!r}: VALUE {value!r} is not a number") from None
    if not math.isfinite(v) or (kind in ("delay", "oversize") and v <= 0):
        raise ValueError(f"fault {spec!r}: VALUE must be a finite number (> 0 for {kind})")
    if kind == "replay" and n == 1:
        raise ValueError(f"fault {spec!r}: replay needs a previous round (ROUND >= 2 or '*')")
    return Fault(kind, silo, n, v)


def _chance(seed: int, what: str, silo: str, rnd: int) -> float:
    digest = hashlib.sha256(f"{seed}/{what}/{silo}/{rnd}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class FaultPlan:
    """Which faults fire for (silo, round): explicit ones plus seeded random drops/corruption."""

    def __init__(
        self,
        faults: list[Fault] | None = None,
        *,
        drop_rate: float = 0.0,
        corrupt_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.faults = list(faults or [])
        self.drop_rate, self.corrupt_rate, self.seed = drop_rate, corrupt_rate, seed
        self._last: dict[str, bytes] = {}
        """Each silo's previous honest reply (for ``replay``)."""

    @classmethod
    def from_specs(cls, specs: list[str] | str, **kwargs: Any) -> FaultPlan:
        if isinstance(specs, str):
            specs = [s for s in specs.split(",") if s.strip()]
        return cls([parse_fault(s) for s in specs], **kwargs)

    def __bool__(self) -> bool:
        return bool(self.faults or self.drop_rate or self.corrupt_rate)

    def at(self, silo: str, rnd: int) -> list[Fault]:
        """The faults that fire for ``silo`` in round ``rnd``, in the order written."""
        out = [f for f in self.faults if f.silo == silo and f.round in (0, rnd)]
        if self.drop_rate and _chance(self.seed, "drop", silo, rnd) < self.drop_rate:
            out.append(Fault("drop", silo, rnd))
        elif self.corrupt_rate and _chance(self.seed, "corrupt", silo, rnd) < self.corrupt_rate:
            out.append(Fault("corrupt", silo, rnd))
        return out

    def remember(self, silo: str, payload: bytes) -> bytes | None:
        """Record ``silo``'s honest reply; return the previous one (what ``replay`` sends)."""
        previous = self._last.get(silo)
        self._last[silo] = payload
        return previous


def _retensor(
    payload: bytes, change: Any, key: Ed25519PrivateKey | None, *, sign: bool = True
) -> bytes:
    """Decode, change the tensors, re-encode with the same header fields (and signature)."""
    p = decode_payload(payload)
    tensors = change({n: t.clone() for n, t in p.tensors.items()})
    return encode_payload(
        tensors,
        codec=p.codec,
        kind=p.kind,
        run_id=p.run_id,
        round=p.round,
        sender=p.sender,
        meta=p.meta,
        block_size=p.block_size,
        keep=p.keep,
        fragment=p.fragment,
        signing_key=key if sign and p.signed else None,
    )


def _flip_byte(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0xFF
    return bytes(b)


def _first(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


def tamper(
    fault: Fault,
    payload: bytes,
    *,
    key: Ed25519PrivateKey | None = None,
    previous: bytes | None = None,
    other: bytes | None = None,
) -> list[bytes]:
    """The bytes a faulty silo sends instead of ``payload`` (none, one, or two for duplicate).

    ``key`` is the silo's own signing key, ``previous`` its last round's reply, ``other``
    another silo's reply of this round. Lost-reply kinds (kill, drop, delay) are the engine's.
    """
    kind, v = fault.kind, fault.value
    if kind == "duplicate":
        return [payload, payload]
    if kind == "corrupt":
        _, start = read_header(payload)
        middle = start + (len(payload) - start) // 2 if len(payload) > start else 4
        return [_flip_byte(payload, middle)]
    if kind == "truncate":
        return [payload[: len(payload) // 2]]
    if kind == "bad_signature":
        if not read_header(payload)[0].get("signed"):
            raise ValueError("bad_signature needs transport.sign_updates = true")
        return [_flip_byte(payload, len(payload) - 1)]
    if kind == "unsigned":
        return [_retensor(payload, lambda t: t, key, sign=False)]
    if kind == "replay":
        return [previous] if previous is not None else [payload]
    if kind == "impersonate":
        if other is None:
            raise ValueError("impersonate needs another silo's payload of the round")
        return [other]
    change: Any
    if kind in ("nan", "inf"):
        bad = math.nan if kind == "nan" else math.inf

        def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            t[_first(t)].reshape(-1)[0] = bad
            return t

    elif kind == "wrong_shape":

        def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            n = _first(t)
            t[n] = t[n].reshape(-1)[:-1].clone() if t[n].numel() > 1 else t[n].reshape(1, 1)
            return t

    elif kind == "wrong_dtype":

        def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: x.double() for n, x in t.items()}

    elif kind == "wrong_keys":

        def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            n = _first(t)
            t[n + ".renamed"] = t.pop(n)
            return t

    elif kind == "oversize":

        def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            t["~padding"] = torch.zeros(int(v))
            return t

    elif kind in ("scale", "flip"):
        factor = -1.0 if kind == "flip" else v

        def change(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: x * factor for n, x in t.items()}

    else:
        raise ValueError(f"fault kind {kind!r} does not change a payload")
    return [_retensor(payload, change, key)]
