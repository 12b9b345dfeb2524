"""Codec throughput as a fraction of memcpy of the same fp32 bytes, one thread.

For each codec and size: encode+decode time vs ``np.copyto`` of the fp32 array (the baseline is
measured in the same run). Checksum (sha256 of the encoded body) and Ed25519 signing are timed
separately, also as fractions of memcpy.

    python bench/codecs.py                 # 1M and 64M elements
    python bench/codecs.py --sizes 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.transport import CODECS, get_codec


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_size(n: int, repeat: int) -> None:
    """Print one table block for ``n`` elements."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    src = x.numpy()
    dst = np.empty_like(src)
    memcpy = best_of(lambda: np.copyto(dst, src), repeat * 3)
    print(f"{'memcpy':18} {n:>11,} {memcpy:10.4f} {1.0:9.3f} {4 * n / memcpy / 1e9:10.2f}")
    for name in (k for k, c in CODECS.items() if not getattr(c, "internal", False)):
        codec = get_codec(name)
        t = best_of(lambda c=codec: c.decode(c.encode(x), n), repeat)
        print(f"{name:18} {n:>11,} {t:10.4f} {memcpy / t:9.3f} {4 * n / t / 1e9:10.2f}")
    body = get_codec("int4").encode(x)
    key = Ed25519PrivateKey.generate()
    sha = best_of(lambda: hashlib.sha256(body).digest(), repeat)
    sig = best_of(lambda: key.sign(body), repeat)
    for label, t in (("sha256(int4 body)", sha), ("ed25519 sign(int4)", sig)):
        print(f"{label:18} {n:>11,} {t:10.4f} {memcpy / t:9.3f} {4 * n / t / 1e9:10.2f}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 64_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'codec':18} {'elements':>11} {'enc+dec s':>10} {'x memcpy':>9} {'GB/s fp32':>10}")
    for n in args.sizes:
        bench_size(n, args.repeat)


if __name__ == "__main__":
    main()
