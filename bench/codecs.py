"""Codec throughput as a fraction of memcpy of the same fp32 bytes, with 1 and 2 threads.

For each codec: encode+decode time, and decode+add into an fp32 sum (what aggregation does with
each reply) time, as ``t(np.copyto of the fp32 array) / t(codec)`` — the baseline is measured
in the same run. The same ratios for the torch formulation every codec is checked against
(tests/transport/codec_reference.py: the implementation before the compiled kernels) show what
changed. Checksum (sha256 of the int4 body) and Ed25519 signing are timed too.

    python bench/codecs.py                  # 64M values (~2 min on 2 cores)
    python bench/codecs.py --values 1000000 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "transport"))
import codec_reference as ref  # noqa: E402

from fedtrain.transport import get_codec  # noqa: E402

CODECS = ("int8", "int4", "fp4-e2m1", "sign1")
REFERENCE = {
    "int8": ref.Int8Codec,
    "int4": ref.Int4Codec,
    "fp4-e2m1": ref.Fp4Codec,
    "sign1": ref.Sign1Codec,
}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(n: int, threads: int, repeat: int, with_reference: bool) -> dict:
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    src = x.numpy()
    dst = np.empty_like(src)
    memcpy = best_of(lambda: np.copyto(dst, src), repeat * 3)
    out: dict = {"memcpy_s": memcpy, "encdec": {}, "decode_add": {}, "ref_encdec": {}}
    out["ref_decode_add"] = {}
    total = torch.zeros(n)
    for name in CODECS:
        c = get_codec(name)
        body = c.encode(x)
        c.decode(body, n)  # compiled before timing
        out["encdec"][name] = memcpy / best_of(lambda c=c: c.decode(c.encode(x), n), repeat)
        out["decode_add"][name] = memcpy / best_of(
            lambda c=c, b=body: c.decode_add(b, n, total), repeat
        )
        if with_reference:
            r = REFERENCE[name]()
            out["ref_encdec"][name] = memcpy / best_of(lambda r=r: r.decode(r.encode(x), n), 1)
            out["ref_decode_add"][name] = memcpy / best_of(
                lambda r=r, b=body: total.add_(r.decode(b, n)), 1
            )
    body = get_codec("int4").encode(x)
    key = Ed25519PrivateKey.generate()
    out["sha256_int4"] = memcpy / best_of(lambda: hashlib.sha256(body).digest(), repeat)
    out["ed25519_int4"] = memcpy / best_of(lambda: key.sign(bytes(body)), repeat)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=64_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args()
    n = args.values
    runs = {t: measure(n, t, args.repeat, with_reference=(t == 1)) for t in (1, 2)}
    one, two = runs[1], runs[2]
    print(f"{n:,} fp32 values; memcpy {one['memcpy_s'] * 1e3:.1f} ms (1 thread)")
    cols = ("enc+dec", "2 thr", "torch", "dec+add", "2 thr", "torch")
    print(f"{'codec':10} " + " ".join(f"{c:>8}" for c in cols))
    for name in CODECS:
        print(
            f"{name:10} {one['encdec'][name]:8.3f} {two['encdec'][name]:7.3f} "
            f"{one['ref_encdec'][name]:7.3f} {one['decode_add'][name]:8.3f} "
            f"{two['decode_add'][name]:7.3f} {one['ref_decode_add'][name]:7.3f}"
        )
    print(f"sha256(int4 body) {one['sha256_int4']:.3f}, ed25519 sign {one['ed25519_int4']:.3f}")
    print("(ratios: t(memcpy of the fp32 values) / t(codec); torch = the reference, 1 thread)")
    if args.json:
        r3 = lambda d: {k: round(v, 3) for k, v in d.items()}  # noqa: E731
        print(
            json.dumps(
                {
                    "encdec_vs_memcpy": r3(one["encdec"]),
                    "decode_add_vs_memcpy": r3(one["decode_add"]),
                    "threads": 1,
                    "two_threads": {
                        "encdec_vs_memcpy": r3(two["encdec"]),
                        "decode_add_vs_memcpy": r3(two["decode_add"]),
                    },
                    "reference_torch": {
                        "encdec_vs_memcpy": r3(one["ref_encdec"]),
                        "decode_add_vs_memcpy": r3(one["ref_decode_add"]),
                    },
                    "values": n,
                }
            )
        )


if __name__ == "__main__":
    main()
