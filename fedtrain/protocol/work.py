"""What one silo is asked to do in a round: one dataclass per kind of work and one JSON codec.

Every party that moves work across a boundary uses :func:`work_to_json` /
:func:`work_from_json`: the deployed engine's round header, the silo daemon that reads it, and
the coordinator's commit record (work still outstanding when a round closes, for resume).
No torch here: the mailbox ClientApp imports :mod:`fedtrain.protocol`.

The JSON form is flat: ``{"kind": ..., "steps": ..., "names": ..., <the kind's own fields>}``.
Two older forms are still read, so a run store written before the typed work resumes: the
commit record's list ``[kind, steps, names, extra]`` and the header dict
``{"kind", "steps", "names", "extra"}``, whose ``extra`` holds the kind's fields under their
old keys (the zeroth-order ones prefixed ``zo_``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "WORK_KINDS",
    "CodedWork",
    "GradWork",
    "TrainWork",
    "Work",
    "WorkFormatError",
    "ZOWork",
    "work_from_json",
    "work_to_json",
]


class WorkFormatError(ValueError):
    """A work description that does not parse: unknown kind, unknown, missing or mistyped field."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Work:
    """What one silo is asked to do in a round (the common part of every kind)."""

    kind: ClassVar[str]
    """The kind's name on the wire (a class attribute of each kind)."""
    steps: int
    """Inner steps to run (for zeroth-order work: projected gradients to compute)."""
    names: list[str] | None = None
    """Parameters (or reply tensors) to return; None = all."""

    def reply_shapes(self) -> dict[str, list[int]] | None:
        """Shapes the reply's tensors must have (None: those of the named parameters)."""
        return None


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainWork(Work):
    """Train ``steps`` inner steps and return the pseudo-gradient (DiLoCo and its variants)."""

    kind: ClassVar[str] = "train"
    fragment: int | None = None
    """Streaming DiLoCo: the fragment this round synchronises (``names`` are its parameters)."""
    apply_at: int = 0
    """Streaming DiLoCo: inner steps trained before the previous round's update is merged (the
    overlap τ); 0 = merge first."""
    alpha: float = 0.0
    """Streaming DiLoCo: merge weight of the local parameters, θ ← α·θ_local + (1−α)·θ̃."""
    group: int | None = None
    """FedCompass: the aggregation group this work belongs to."""


@dataclass(kw_only=True, slots=True, frozen=True)
class CodedWork(Work):
    """Gradient coding: train each of ``shards`` from the global start and return
    Σ_j coeffs_j · g_j."""

    kind: ClassVar[str] = "coded"
    shards: list[int]
    """Public shards this silo trains."""
    coeffs: list[float]
    """The encoding coefficient of each shard (same order)."""
    step0: int
    """Step position of every replica of a shard (data order and LR schedule)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class GradWork(Work):
    """One step's gradient at the current weights (the data-parallel baseline)."""

    kind: ClassVar[str] = "grad"


@dataclass(kw_only=True, slots=True, frozen=True)
class ZOWork(Work):
    """Zeroth-order: ``steps`` projected gradients at the global weights, one byte each."""

    kind: ClassVar[str] = "zo"
    eps: float
    """SPSA perturbation size."""
    scale: float
    """Scale of the one-byte code."""
    perturbation: str
    """Distribution of the perturbation direction."""
    perturbed: list[str]
    """Parameters the perturbation covers."""

    def reply_shapes(self) -> dict[str, list[int]] | None:
        return {"codes": [self.steps]}


WORK_KINDS: dict[str, type[Work]] = {
    cls.kind: cls for cls in (TrainWork, CodedWork, GradWork, ZOWork)
}
"""Every kind of work by its wire name."""

_LEGACY_KEYS: dict[str, str] = {
    "zo_eps": "eps",
    "zo_scale": "scale",
    "zo_perturbation": "perturbation",
    "zo_names": "perturbed",
}
"""Old ``extra`` keys whose field has another name."""

_LEGACY_DERIVED = {"shapes"}
"""Old ``extra`` keys now derived from the other fields (:meth:`Work.reply_shapes`)."""


def work_to_json(work: Work) -> dict[str, Any]:
    """The JSON form of ``work`` (``{"kind": ..., <every field>}``)."""
    kind = getattr(type(work), "kind", None)
    if WORK_KINDS.get(str(kind)) is not type(work):
        raise WorkFormatError(f"{type(work).__name__} is not a registered kind of work")
    out: dict[str, Any] = {"kind": kind}
    for f in dataclasses.fields(work):
        value = getattr(work, f.name)
        out[f.name] = list(value) if isinstance(value, list) else value
    return out


def work_from_json(data: Mapping[str, Any] | Sequence[Any]) -> Work:
    """Parse what :func:`work_to_json` wrote (or one of the older forms, see the module doc).

    Raises
    ------
    WorkFormatError
        Unknown kind, a field the kind does not have, a missing field or a value of the wrong
        type; the message names the kind and the field.
    """
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        if len(data) != 4:
            raise WorkFormatError(
                f"work as a list must be [kind, steps, names, extra], got {len(data)} items"
            )
        kind, steps, names, extra = data
        data = {"kind": kind, "steps": steps, "names": names, "extra": extra}
    if not isinstance(data, Mapping):
        raise WorkFormatError(f"work must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in WORK_KINDS:
        raise WorkFormatError(f"unknown work kind {kind!r} (known: {', '.join(WORK_KINDS)})")
    cls = WORK_KINDS[kind]
    given = {k: v for k, v in data.items() if k != "kind"}
    if "extra" in given:
        given = _from_legacy(kind, given)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise WorkFormatError(f"{kind} work has no field {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in given:
            if f.default is dataclasses.MISSING:
                raise WorkFormatError(f"{kind} work lacks the field {name!r}")
            continue
        values[name] = _parse(given[name], hints[name], f"{kind} work field {name!r}")
    return cls(**values)


def _from_legacy(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """Fields of the pre-typed form: ``steps``, ``names`` and the kind's fields in ``extra``."""
    extra = given.pop("extra")
    if not isinstance(extra, Mapping):
        raise WorkFormatError(f"{kind} work: 'extra' must be a JSON object")
    for key, value in extra.items():
        if key in _LEGACY_DERIVED:
            continue
        field = _LEGACY_KEYS.get(str(key), str(key))
        if field in given:
            raise WorkFormatError(f"{kind} work gives the field {field!r} twice")
        given[field] = value
    return given


def _parse(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the type hint ``tp`` (int, float, str, None, list[X], unions);
    ints are accepted where a float is expected and come back as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _parse(value, option, where)
            except WorkFormatError:
                continue
        raise WorkFormatError(f"{where}: {value!r} is not {_describe(tp)}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise WorkFormatError(f"{where}: {value!r} is not {_describe(tp)}")
        (item,) = typing.get_args(tp)
        return [_parse(v, item, where) for v in value]
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # a field type this parser does not know: a programming error, not bad input
        raise AssertionError(f"{where}: no parser for {tp!r}")
    raise WorkFormatError(f"{where}: {value!r} is not {_describe(tp)}")


def _describe(tp: Any) -> str:
    """``tp`` as a reader would write it (``list[int] | None``)."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")
