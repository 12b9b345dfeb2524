"""Fuzz tests: hostile bytes never crash the payload decoder or the update validator.

Properties, over random bytes, mutated valid payloads, mutated JSON headers (re-framed, with the
checksum and signature optionally recomputed so the decoder goes deeper) and validly encoded
tensor-level lies:

- :func:`decode_payload` returns a payload or raises :class:`PayloadError` with a message —
  never another exception — and never decodes more than 8 values per byte received;
- :meth:`UpdateValidator.check` returns a payload that really is this silo's finite, in-bound
  update of the model's keys and shapes, or raises :class:`UpdateRejected` with a message;
- an unmodified payload is accepted, and a lie is rejected exactly when it is one.

Run with ``-s`` to see how many cases each property ran.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from fedtrain.config import ReliabilitySection
from fedtrain.server.validate import UpdateRejected, UpdateValidator
from fedtrain.transport.codecs import get_codec
from fedtrain.transport.payload import (
    MAGIC,
    Payload,
    PayloadError,
    decode_payload,
    encode_payload,
    header_digest,
)

RUN, ROUND, SILO, KIND = "run-fuzz", 7, "silo1", "pseudo_grad"
CODECS = ("fp32", "bf16", "int8", "int4", "fp4-e2m1", "sign1")
BLOCKS = (64, 8, 5)
SPARSE = ("topk-int2", "topk-int4")
PAIRS = [(c, b) for c in CODECS for b in BLOCKS] + [(c, b) for c in SPARSE for b in (64, 8)]
"""(codec, block size) of the payloads fuzzed; a sparse codec's block is its chunk (a power of
two) and it keeps an eighth of each chunk (:func:`keep_of`)."""


def keep_of(codec: str, block: int) -> int:
    return max(1, block // 8) if codec in SPARSE else 0


def codec_of(codec: str, block: int) -> Any:
    return get_codec(codec, block_size=block, keep=keep_of(codec, block))


BOUND = 10.0
"""Norm bound of the validators; the honest update's norm is about 0.3."""

_gen = torch.Generator().manual_seed(0)
PARAMS: dict[str, torch.nn.Parameter] = {
    "emb.weight": torch.nn.Parameter(torch.randn(6, 5, generator=_gen)),
    "ln.bias": torch.nn.Parameter(torch.randn(24, generator=_gen)),
    "head.weight": torch.nn.Parameter(torch.randn(2, 3, 4, generator=_gen)),
}
HONEST = {n: 0.03 * torch.randn(p.shape, generator=_gen) for n, p in PARAMS.items()}
# Fixed keys (not generate()) so that every run fuzzes the very same bytes.
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz/silo1").digest())
OTHER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz/other").digest())

RUNS: Counter[str] = Counter()
"""Cases each property ran in this process."""
MIN_RUNS = {
    "random_bytes": 300,
    "random_framed": 300,
    "byte_mutations": 400,
    "header_mutations": 400,
    "table_lies": 300,
    "tensor_lies": 300,
}
"""Cases each property must have run (its ``max_examples``)."""


def fuzz(name: str) -> settings:
    """Deterministic settings running ``MIN_RUNS[name]`` cases, each within 2 s (hangs fail)."""
    return settings(
        max_examples=MIN_RUNS[name],
        deadline=timedelta(seconds=2),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", autouse=True)
def _case_counts() -> Iterator[None]:
    """After the module: print each property's case count and check it ran them all."""
    yield
    print("\nfuzz cases: " + ", ".join(f"{k}={v}" for k, v in sorted(RUNS.items())))
    print(f"fuzz cases total: {sum(RUNS.values())}")
    short = {k: v for k, v in RUNS.items() if v < MIN_RUNS[k]}
    assert not short, f"properties ran fewer cases than intended: {short} (want {MIN_RUNS})"


# ---------------------------------------------------------------------------------------------
# The contracts every case checks.


def tally(what: str, e: Exception | None = None) -> None:
    """Count an outcome for ``--hypothesis-show-statistics`` (numbers and names cut)."""
    if currently_in_test_context():
        event(what + (re.sub(r"\d+|'[^']*'", "_", " ".join(str(e).split()[:4])) if e else ""))


def decode_or_error(data: bytes, key: Ed25519PrivateKey | None = None) -> Payload | None:
    """Decode ``data``: a payload, or None for a PayloadError; any other exception fails."""
    try:
        p = decode_payload(data, public_key=None if key is None else key.public_key())
    except PayloadError as e:
        assert str(e).strip(), "PayloadError without a message"
        if key is None:
            tally("decode: ", e)
        return None
    # Memory safety: no codec carries less than 1 bit per value, so what the header claims
    # cannot make the decoder materialise more than 8 values per byte it received.
    assert p.numel <= 8 * len(data)
    for name, t in p.tensors.items():
        assert t.dtype == torch.float32, name
    if key is not None:
        assert p.signed
    return p


def validator(*, keys: bool, clip: bool = False, bound: float = BOUND) -> UpdateValidator:
    """The coordinator's validator for :data:`PARAMS` (with SILO's public key if ``keys``)."""
    return UpdateValidator(
        run_id=RUN,
        params=PARAMS,
        kind=KIND,
        limits=ReliabilitySection(max_update_norm=bound, norm_action="clip" if clip else "reject"),
        public_keys={SILO: KEY.public_key(), "silo2": OTHER.public_key()} if keys else None,
    )


def check_or_rejected(v: UpdateValidator, data: bytes) -> Payload | None:
    """``v.check(data)``: a payload that genuinely fits, or None for UpdateRejected."""
    try:
        p = v.check(data, silo=SILO, round=ROUND)
    except UpdateRejected as e:
        assert str(e).strip(), "UpdateRejected without a message"
        if v.public_keys is None:
            tally("check: ", e)
        return None
    assert (p.run_id, p.round, p.sender, p.kind) == (RUN, ROUND, SILO, KIND)
    assert set(p.tensors) == set(PARAMS)
    for name, t in p.tensors.items():
        assert t.shape == PARAMS[name].shape, name
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()), name
        assert p.dtypes.get(name, "float32") == "float32", name
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in p.tensors.values()))
    assert norm <= v.limits.max_update_norm * (1 + 1e-5)
    if v.public_keys is not None:
        assert p.signed
    if v.public_keys is None:
        tally("check: accepted")
    return p


def check_all(data: bytes) -> tuple[Payload | None, Payload | None]:
    """Both contracts, with and without signatures required: (decoded, accepted unsigned)."""
    decoded = decode_or_error(data)
    decode_or_error(data, KEY)
    accepted = check_or_rejected(validator(keys=False), data)
    check_or_rejected(validator(keys=True, clip=True), data)
    return decoded, accepted


@functools.cache
def valid(codec: str, block_size: int, signed: bool) -> bytes:
    """SILO's honest update of this round, encoded properly."""
    return encode_payload(
        HONEST,
        codec=codec,
        kind=KIND,
        run_id=RUN,
        round=ROUND,
        sender=SILO,
        meta={"tokens": 640, "loss": 2.5},
        block_size=block_size,
        keep=keep_of(codec, block_size),
        signing_key=KEY if signed else None,
    )


def split(data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, body, signature) of a valid payload; the header without its own digest (which
    stops nearly every header edit at once), so edits reach the checks behind it."""
    (hlen,) = struct.unpack(">I", data[4:8])
    header = json.loads(data[8 : 8 + hlen])
    del header["header_sha256"]
    tail = 64 if header["signed"] else 0
    return header, data[8 + hlen : len(data) - tail], data[len(data) - tail :]


def frame(head: bytes, body: bytes) -> bytes:
    """Framed as a silo would: a header that parses gets its digest (the edits are the lie)."""
    try:
        header = json.loads(head)
    except (ValueError, RecursionError):
        header = None
    if isinstance(header, dict) and "header_sha256" not in header:
        header["header_sha256"] = header_digest(header)
        head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + body


bases = st.tuples(st.sampled_from(PAIRS), st.booleans()).map(lambda t: (*t[0], t[1]))


def test_every_header_bit_flip_is_caught_without_a_signature() -> None:
    """The header digest covers what the body checksum does not (ids, meta, block size)."""
    data = valid("int4", 64, False)
    (hlen,) = struct.unpack(">I", data[4:8])
    flips = 0
    for pos in range(8, 8 + hlen):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(PayloadError):
                decode_payload(bytes(bad))
            flips += 1
    assert flips == 8 * hlen > 2000


def test_unmodified_payloads_pass_every_codec() -> None:
    """The baseline the properties mutate: every valid payload is accepted as sent."""
    for codec, block in PAIRS:
        for signed in (False, True):
            data = valid(codec, block, signed)
            decoded, accepted = check_all(data)
            assert decoded is not None and accepted is not None
            assert (check_or_rejected(validator(keys=True), data) is not None) == signed
            c = codec_of(codec, block)
            for n, t in HONEST.items():
                want = c.roundtrip(t.reshape(-1)).reshape(t.shape)
                assert torch.equal(accepted.tensors[n], want), (codec, block, n)


# ---------------------------------------------------------------------------------------------
# 1. Random bytes, bare and behind the magic and a plausible header length.


@fuzz("random_bytes")
@given(data=st.binary(max_size=600) | st.binary(max_size=8).map(lambda b: MAGIC[:3] + b))
def test_random_bytes(data: bytes) -> None:
    """Noise, and noise behind part of the magic, is refused."""
    RUNS["random_bytes"] += 1
    decoded, accepted = check_all(data)
    assert decoded is None and accepted is None


# JSON values of every kind, including ints past int64 and non-finite floats.
json_ints = (
    st.integers(-3, 100)
    | st.integers()
    | st.integers(-(10**400), 10**400)
    | st.sampled_from([2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1])
    | st.sampled_from([10**30, 10**308, 10**309, 10**400, -(10**400)])
)
dim_ints = st.integers(0, 3) | st.sampled_from([2**31, 2**62, 2**63, 10**30]) | json_ints
"""Tensor dimensions: mostly plausible, some past int64, some anything."""
json_scalars = (
    st.none()
    | st.booleans()
    | json_ints
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*CODECS, "code8", *PARAMS, "float32", "float64", RUN, SILO, KIND])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# JSON text json.dumps cannot write: long int literals (past Python's 4300-digit limit),
# nesting deeper than the recursion limit, and the non-standard constants.
json_oddities = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.integers(1, 6000).map(lambda n: "-1" + "0" * n),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "0" + "}" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "0.0", "1.0", "1E2", "true"]),
)
json_texts = json_values.map(json.dumps) | json_oddities

HEADER_KEYS = sorted(split(valid("fp32", 64, False))[0])


@st.composite
def random_headers(draw: st.DrawFn) -> bytes:
    """JSON text of an object with some of the real header's keys, holding arbitrary values."""
    keys = draw(st.lists(st.sampled_from(HEADER_KEYS), unique=True))
    fields = [f"{json.dumps(k)}:{draw(json_texts)}" for k in keys]
    if draw(st.booleans()):
        fields.insert(0, '"format":1')
    return ("{" + ",".join(fields) + "}").encode()


@fuzz("random_framed")
@given(
    head=random_headers() | st.binary(max_size=200) | json_texts.map(str.encode),
    body=st.binary(max_size=200),
    length=st.integers(-20, 20).map(lambda d: ("off by", d))
    | st.integers(0, 2**32 - 1).map(lambda v: ("any", v)),
)
def test_random_bytes_after_the_magic(head: bytes, body: bytes, length: tuple[str, int]) -> None:
    """The magic, any header length, then noise, pathological JSON or a plausible header."""
    RUNS["random_framed"] += 1
    how, n = length
    hlen = max(0, len(head) + n) if how == "off by" else n
    data = MAGIC + struct.pack(">I", hlen) + head + body
    _, accepted = check_all(data)
    assert accepted is None


# ---------------------------------------------------------------------------------------------
# 2. Byte-level mutations of valid payloads.

Mutation = Callable[[bytearray], None]


def _at(pos: int, b: bytearray) -> int:
    return pos % (len(b) + 1)


def _flip(pos: int, bit: int) -> Mutation:
    def go(b: bytearray) -> None:
        if b:
            b[pos % len(b)] ^= 1 << bit

    return go


def _truncate(pos: int) -> Mutation:
    def go(b: bytearray) -> None:
        del b[_at(pos, b) :]

    return go


def _insert(pos: int, data: bytes) -> Mutation:
    def go(b: bytearray) -> None:
        i = _at(pos, b)
        b[i:i] = data

    return go


def _delete(pos: int, n: int) -> Mutation:
    def go(b: bytearray) -> None:
        i = _at(pos, b)
        del b[i : i + n]

    return go


def _overwrite(pos: int, data: bytes) -> Mutation:
    def go(b: bytearray) -> None:
        i = _at(pos, b)
        b[i : i + len(data)] = data

    return go


def _append(data: bytes) -> Mutation:
    return lambda b: b.extend(data)


positions = st.integers(0, 4096)
byte_mutations = st.one_of(
    st.builds(_flip, positions, st.integers(0, 7)),
    st.builds(_truncate, positions),
    st.builds(_insert, positions, st.binary(max_size=16)),
    st.builds(_delete, positions, st.integers(1, 64)),
    st.builds(_overwrite, positions, st.binary(min_size=1, max_size=8)),
    st.builds(_append, st.binary(max_size=80)),
)


@fuzz("byte_mutations")
@given(base=bases, mutations=st.lists(byte_mutations, max_size=4))
def test_byte_mutations_of_valid_payloads(
    base: tuple[str, int, bool], mutations: list[Mutation]
) -> None:
    """Bit flips, truncation, insertion, deletion, overwriting and appending."""
    RUNS["byte_mutations"] += 1
    original = valid(*base)
    b = bytearray(original)
    for m in mutations:
        m(b)
    data = bytes(b)
    decoded, accepted = check_all(data)
    if data == original:  # the mutations cancelled out: still a valid payload
        assert decoded is not None and accepted is not None


# ---------------------------------------------------------------------------------------------
# 3. Header-level mutations, re-framed with the right header length.

SENTINEL = "\x00fuzz{}\x00"
LIST_KEYS = ("names", "shapes", "dtypes", "numels", "sizes")
FIELD_EDITS = ("field", "element", "shape", "delete", "add", "nudge")
"""Edits that write arbitrary JSON into the header."""
TABLE_EDITS = ("claim", "empty", "nudge")
"""Edits of the tensor table (names, shapes, numels, sizes) that keep it well-typed."""


@st.composite
def header_edits(draw: st.DrawFn, kinds: tuple[str, ...]) -> tuple[str, Any, Any]:
    """One edit of a kind in ``kinds`` (see :func:`apply_edits`)."""
    what = draw(st.sampled_from(kinds))
    if what in ("field", "delete"):
        return what, draw(st.sampled_from(HEADER_KEYS)), None
    if what == "element":
        return what, draw(st.sampled_from(LIST_KEYS)), draw(st.integers(0, 3))
    if what == "shape":
        return what, draw(st.integers(0, 2)), draw(st.integers(0, 3))
    if what == "claim":  # a tensor's shape and count agree on any number: on to the codec
        return what, draw(st.integers(0, 2)), draw(json_ints)
    if what == "empty":  # one more tensor, of no values, in any shape holding a zero
        n = draw(st.integers(0, 70))
        dims = draw(st.lists(dim_ints, min_size=n, max_size=n))
        dims.insert(draw(st.integers(0, n)), 0)
        return what, draw(st.text(max_size=8)), dims
    if what == "nudge":  # small integer change of a count, to reach the consistency checks
        key = draw(st.sampled_from(["numels", "sizes", "body_bytes", "block_size", "round"]))
        return what, (key, draw(st.integers(0, 2))), draw(st.integers(-70, 70))
    return what, draw(st.text(min_size=1, max_size=8)), None


def apply_edits(header: dict[str, Any], edits: list[tuple[str, Any, Any]]) -> list[str]:
    """Apply ``edits`` to ``header``; placeholders for the drawn JSON texts, in order.

    field/element/shape: replace a field, a list element or a shape entry with a JSON text;
    delete/add: a field; claim: a tensor's shape and count; empty: append a tensor of no values;
    nudge: add a small integer to a count.
    """
    holes: list[str] = []

    def hole() -> str:
        holes.append(SENTINEL.format(len(holes)))
        return holes[-1]

    for what, a, b in edits:
        if what == "field":
            header[a] = hole()
        elif what == "delete":
            header.pop(a, None)
        elif what == "add":
            header[a] = hole()
        elif what == "element" and isinstance(header.get(a), list):
            lst = header[a]
            if b < len(lst):
                lst[b] = hole()
            else:
                lst.append(hole())
        elif what == "shape" and isinstance(header.get("shapes"), list):
            shapes = header["shapes"]
            if a < len(shapes) and isinstance(shapes[a], list):
                if b < len(shapes[a]):
                    shapes[a][b] = hole()
                else:
                    shapes[a].append(hole())
        elif what == "claim" and all(isinstance(header.get(k), list) for k in LIST_KEYS):
            if a < min(len(header["shapes"]), len(header["numels"])):
                header["shapes"][a], header["numels"][a] = [b], b
        elif what == "empty" and all(isinstance(header.get(k), list) for k in LIST_KEYS):
            for key, value in zip(LIST_KEYS, (a, b, "float32", 0, 0), strict=True):
                header[key].append(value)
        elif what == "nudge":
            key, i = a
            v = header.get(key)
            if isinstance(v, list) and i < len(v) and type(v[i]) is int:
                v[i] += b
            elif type(v) is int:
                header[key] = v + b
    return holes


@fuzz("header_mutations")
@given(
    base=bases,
    edits=st.lists(header_edits(FIELD_EDITS), max_size=3),
    texts=st.lists(json_texts, min_size=12, max_size=12),
    body_flips=st.lists(st.tuples(positions, st.integers(0, 7)), max_size=3),
    rehash=st.booleans(),
    resign=st.booleans(),
)
def test_header_mutations(
    base: tuple[str, int, bool],
    edits: list[tuple[str, Any, Any]],
    texts: list[str],
    body_flips: list[tuple[int, int]],
    rehash: bool,
    resign: bool,
) -> None:
    """Header fields replaced by any JSON, deleted or added; body bits flipped; re-framed."""
    RUNS["header_mutations"] += 1
    header, body, signature = split(valid(*base))
    new_body = bytearray(body)
    for pos, bit in body_flips:
        if new_body:
            new_body[pos % len(new_body)] ^= 1 << bit
    if rehash:  # the decoder then goes past the checksum, into the codecs
        header["body_sha256"] = hashlib.sha256(new_body).hexdigest()
    holes = apply_edits(header, edits)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True)
    for h, text in zip(holes, texts, strict=False):
        head = head.replace(json.dumps(h), text, 1)
    data = frame(head.encode(), bytes(new_body))
    if signature:  # signed the way the silo would have, or the original (now stale) signature
        data += KEY.sign(data) if resign else signature
    decoded, accepted = check_all(data)
    if not edits and not body_flips and (resign or not signature):
        assert decoded is not None and accepted is not None


@fuzz("table_lies")
@given(base=bases, edits=st.lists(header_edits(TABLE_EDITS), min_size=1, max_size=3))
def test_tensor_table_lies(base: tuple[str, int, bool], edits: list[tuple[str, Any, Any]]) -> None:
    """The tensor table edited, the rest intact: checksum and signature pass, the table must not."""
    RUNS["table_lies"] += 1
    header, body, signature = split(valid(*base))
    assert not apply_edits(header, edits)  # no JSON texts to fill in
    data = frame(json.dumps(header).encode(), body)
    if signature:
        data += KEY.sign(data)
    check_all(data)


# ---------------------------------------------------------------------------------------------
# 4. Lies told with valid encodings: values, shapes, keys, dtypes, ids, signatures, norm.

SHAPE_LIES: dict[str, list[tuple[int, ...]]] = {
    "emb.weight": [(5, 6), (30,), (6, 5, 1), (29,), (7, 5)],
    "ln.bias": [(24, 1), (4, 6), (23,), (25,), (1, 24)],
    "head.weight": [(2, 12), (3, 2, 4), (24,), (2, 3, 3), (2, 3, 4, 1)],
}
OTHER_IDS: dict[str, list[Any]] = {
    "run_id": ["run-other", "", RUN + " "],
    "round": [ROUND - 1, ROUND + 1, 0, -1, 2**40],
    "sender": ["silo2", "coordinator", "silo1 "],
    "kind": ["weights", "grad", "update"],
}
sometimes = st.integers(0, 3).map(lambda i: i == 0)
"""True one time in four: a few lies at once, and often none."""


@st.composite
def lies(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Tensors and encode arguments with zero or more lies, and the lies actually told."""
    tensors = {n: t.clone() for n, t in HONEST.items()}
    target = draw(st.sampled_from(sorted(PARAMS)))
    if draw(sometimes):
        flat = tensors[target].reshape(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
    if draw(sometimes):
        shape = draw(st.sampled_from(SHAPE_LIES[target]))
        flat = tensors[target].reshape(-1)
        n = math.prod(shape)
        tensors[target] = torch.cat([flat, flat.new_zeros(max(0, n - flat.numel()))])[:n]
        tensors[target] = tensors[target].reshape(shape)
    if draw(sometimes):
        del tensors[draw(st.sampled_from(sorted(tensors)))]
    if draw(sometimes):
        tensors[draw(st.text(min_size=1, max_size=10))] = torch.zeros(draw(st.integers(0, 5)))
    dtype = draw(st.sampled_from([torch.float32] * 6 + [torch.float64, torch.float16]))
    name = draw(st.sampled_from(sorted(tensors)))
    tensors[name] = tensors[name].to(dtype)
    scaled = draw(sometimes)
    if scaled:
        tensors = {n: t * 1e4 for n, t in tensors.items()}  # norm ~3000, bound 10
    ids: dict[str, Any] = {"run_id": RUN, "round": ROUND, "sender": SILO, "kind": KIND}
    lie = draw(st.sampled_from([None, None, None, *ids]))
    if lie is not None:  # one id at most: the validator stops at the first
        ids[lie] = draw(st.sampled_from(OTHER_IDS[lie]))
    signer = draw(st.sampled_from(["silo", "silo", "silo", "other", "none"]))
    # The lies told, from what is actually sent (a later draw can undo an earlier one).
    ours = {n: t for n, t in tensors.items() if n in PARAMS}
    told = {
        "ids": lie is not None,
        "signature": signer != "silo",
        "keys": set(tensors) != set(PARAMS),
        "shape": any(t.shape != PARAMS[n].shape for n, t in ours.items()),
        "dtype": any(t.dtype != torch.float32 for t in ours.values()),
        "non-finite": any(not bool(torch.isfinite(t).all()) for t in tensors.values()),
        "norm": scaled,
    }
    args = {
        **ids,
        **dict(zip(("codec", "block_size"), draw(st.sampled_from(PAIRS)), strict=True)),
        "signing_key": {"silo": KEY, "other": OTHER, "none": None}[signer],
    }
    return tensors, args, [k for k, yes in told.items() if yes]


@fuzz("tensor_lies")
@given(case=lies(), clip=st.booleans())
def test_tensor_level_lies(
    case: tuple[dict[str, torch.Tensor], dict[str, Any], list[str]], clip: bool
) -> None:
    """Validly encoded lies are rejected exactly when told; the truth arrives bit-exact."""
    RUNS["tensor_lies"] += 1
    tensors, args, told = case
    data = encode_payload(tensors, keep=keep_of(args["codec"], args["block_size"]), **args)
    assert decode_or_error(data) is not None  # well-formed: only the validator can object
    unsigned_lies = [t for t in told if t != "signature"]
    for keys in (False, True):
        lies_here = told if keys else unsigned_lies
        p = check_or_rejected(validator(keys=keys, clip=clip), data)
        if clip:  # clipping turns an over-norm update into an accepted, scaled one
            lies_here = [t for t in lies_here if t != "norm"]
        assert (p is None) == bool(lies_here), (lies_here, args["codec"])
        if p is not None and "norm" not in told:
            c = codec_of(args["codec"], args["block_size"])
            for n, t in tensors.items():
                want = c.roundtrip(t.reshape(-1)).reshape(t.shape)
                assert torch.equal(p.tensors[n], want), n
        if p is not None and "norm" in told:
            assert p.meta["clipped_from_norm"] > BOUND


# ---------------------------------------------------------------------------------------------
# Memory safety: a header claiming huge tensors is refused before anything is allocated.


@pytest.mark.parametrize("codec", [*CODECS, *SPARSE])
@pytest.mark.parametrize("claim", [2**30, 2**40, 2**63, 10**30, 10**400])
def test_huge_claims_are_refused_before_decoding(codec: str, claim: int) -> None:
    header, body, _ = split(valid(codec, 64, False))
    size = codec_of(codec, 64).encoded_size(claim)  # exact integer arithmetic, no float overflow
    assert type(size) is int and size >= claim // 8
    # The lie told consistently: sizes and body_bytes follow the claim, the body does not.
    consistent = dict(header, shapes=[[claim], *header["shapes"][1:]], numels=[claim])
    consistent["numels"] += header["numels"][1:]
    consistent["sizes"] = [size, *header["sizes"][1:]]
    consistent["body_bytes"] = sum(consistent["sizes"])
    # The lie told in the shape and count only: the byte counts stay true.
    counts_only = dict(consistent, sizes=header["sizes"], body_bytes=header["body_bytes"])
    # A zero-sized tensor with absurd dimensions (nothing to allocate, nothing to overflow).
    zero = dict(header, shapes=[[claim, claim, 0], *header["shapes"][1:]])
    zero["numels"] = [0, *header["numels"][1:]]
    zero["sizes"] = [0, *header["sizes"][1:]]
    zero["body_bytes"] = sum(zero["sizes"])
    zero["body_sha256"] = hashlib.sha256(body[header["sizes"][0] :]).hexdigest()
    for h, reason in ((consistent, "header says"), (counts_only, "do not hold|not a tensor shape")):
        data = frame(json.dumps(h).encode(), body)
        with pytest.raises(PayloadError, match=reason):
            decode_payload(data)
        with pytest.raises(UpdateRejected, match=reason):
            validator(keys=False).check(data, silo=SILO, round=ROUND)
    data = frame(json.dumps(zero).encode(), body[header["sizes"][0] :])
    decode_or_error(data)  # an empty tensor at most, or refused if torch cannot size it
    with pytest.raises(UpdateRejected, match="shape"):
        validator(keys=False).check(data, silo=SILO, round=ROUND)
