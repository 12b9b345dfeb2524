"""Zeroth-order exchange math: seeds, directions, one-byte code, SPSA, replay (ALGORITHMS §4)."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import pytest
import torch

from fedtrain.strategies.zo import (
    MAX_RELATIVE_ERROR,
    ZOEntry,
    decode_byte,
    direction,
    encode_byte,
    replay,
    spsa,
    zo_seed,
)


def _digest(seed: int) -> str:
    z = torch.cat([direction(seed, i, n) for i, n in enumerate((1000, 77, 4096))])
    return hashlib.sha256(z.numpy().tobytes()).hexdigest()


def test_z_digests_equal_across_two_processes_and_differ_across_seeds():
    seed = zo_seed("run", 3, "silo1", 7)
    code = f"from tests.strategies.test_zo import _digest; print(_digest({seed}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == _digest(seed)
    assert _digest(seed) != _digest(zo_seed("run", 3, "silo1", 8))


def test_seed_is_blake2b_of_the_fixed_serialisation():
    expected = int.from_bytes(hashlib.blake2b(b"r/1/s/2", digest_size=8).digest(), "little") >> 1
    assert zo_seed("r", 1, "s", 2) == expected and expected < 2**63


def test_rademacher_is_balanced_and_shard_consistent():
    z = direction(99, 2, 100_000)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(100_000)
    # A shard [start, start+n) equals the same slice of the whole tensor (FSDP ranks agree).
    assert torch.equal(direction(99, 2, 300, start=1234), z[1234:1534])
    g = direction(99, 2, 1000, kind="gaussian")
    assert torch.equal(direction(99, 2, 500, kind="gaussian", start=500), g[500:])


def test_one_byte_code_bound_sign_and_zero():
    g = torch.cat([torch.logspace(-6, 6, 2001, dtype=torch.float64), -torch.tensor([3.3, 0.01])])
    scale = 1e-2
    b = encode_byte(g, scale)
    back = decode_byte(b, scale)
    in_range = (g.abs() / scale >= 2 ** (-63 / 8)) & (g.abs() / scale <= 2 ** (63 / 8))
    rel = ((back - g).abs() / g.abs())[in_range]
    assert rel.max().item() <= MAX_RELATIVE_ERROR + 1e-12
    assert rel.max().item() > 0.04  # the bound is tight, not vacuous
    assert torch.equal(torch.sign(back), torch.sign(g))
    assert encode_byte(torch.tensor([0.0]), 1.0).item() == 0
    assert decode_byte(torch.tensor([0], dtype=torch.int8), 1.0).item() == 0.0


def test_stochastic_one_byte_rounding_is_unbiased():
    k = 40_000
    g = torch.full((k,), 0.3)
    b = encode_byte(g, 1.0, stochastic=True, generator=torch.Generator().manual_seed(0))
    mean = decode_byte(b, 1.0).mean().item()
    gap = 0.3 * (2 ** (1 / 8) - 1)  # width of the bracketing interval, roughly
    assert abs(mean - 0.3) <= 5 * (gap / 2) / math.sqrt(k)
    assert abs(decode_byte(encode_byte(g, 1.0), 1.0).mean().item() - 0.3) > abs(mean - 0.3)


def test_spsa_is_unbiased_on_a_quadratic_and_restores_exactly():
    # L(θ) = ½‖θ − c‖², ∇L = θ − c; E[g·z] = ∇L for Rademacher z (E[zzᵀ] = I).
    c = torch.tensor([1.0, -2.0, 0.5, 3.0])
    theta = torch.nn.Parameter(torch.tensor([0.2, 0.1, -0.3, 0.7]))
    start = theta.detach().clone()

    def loss() -> float:
        return 0.5 * float(((theta - c) ** 2).sum())

    k = 4000
    acc = torch.zeros(4)
    for s in range(k):
        g = spsa([theta], loss, seed=s, eps=1e-3)
        acc += g * direction(s, 0, 4)
        assert torch.equal(theta.detach(), start)  # exact restore every time
    grad = start - c
    tol = 5 * grad.norm().item() / math.sqrt(k)
    assert ((acc / k - grad).abs() <= tol).all()


def test_replicas_replaying_the_same_log_end_bitwise_equal():
    def replica():
        g = torch.Generator().manual_seed(0)
        return [
            torch.nn.Parameter(torch.randn(50, 8, generator=g)),
            torch.nn.Parameter(torch.randn(8, generator=g)),
        ]

    log = [
        ZOEntry(round=1, silo=f"silo{s}", sample=k, code=c)
        for s in range(3)
        for k, c in enumerate((70, -55, 3, 0, 101))
    ]
    a, b, coordinator = replica(), replica(), replica()
    replay(a, log, run_id="r", lr=1e-2, scale=0.1)
    replay(b, list(reversed(log)), run_id="r", lr=1e-2, scale=0.1)  # arrival order differs
    replay(coordinator, log[::2] + log[1::2], run_id="r", lr=1e-2, scale=0.1)
    for x, y, z in zip(a, b, coordinator, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert not torch.equal(a[0], replica()[0])  # the replay did something


# ------------------------------------------------------------------ end to end
ZO = [
    "model.preset=tiny",
    "data.tokenizer=byte",
    "data.silos=2",
    "data.max_chars=300000",
    "run.token_budget=0",
    "run.rounds=10",
    "run.eval_batches=8",
    "train.batch_size=8",
    "train.seq_len=32",
    "round.min_silos=1",
    "simulation.profiles=[]",
    "strategy.name=zo",
    "strategy.zo_trainable=tok_emb.*",
    "strategy.zo_lr=3e-3",
    "strategy.zo_samples_per_round=8",
    "storage.cache_bytes=0",
]


@pytest.mark.slow
def test_zo_fine_tuning_learns_with_k_bytes_per_silo_and_identical_replicas(tmp_path):
    from fedtrain.config import load_config
    from fedtrain.simulation.runner import build_simulation
    from fedtrain.transport.payload import read_header

    sim = build_simulation(load_config(None, ZO), tmp_path / "zo", quiet=True)
    s = sim.execute()
    # The control that makes no updates sits at the initial loss; ZO ends well below it.
    assert s["final_eval_loss"] <= s["initial_eval_loss"] - 0.05
    # On the wire: K one-byte codes plus the fixed framing header, per silo and round (the
    # payloads of the last storage.keep_updates rounds are kept; every round's size is).
    rows = sim.store.index.updates()
    kept = [row for row in rows if row["blob"]]
    sizes = [row["bytes"] for row in rows]
    assert kept and max(sizes) - min(sizes) <= 4  # the header's numbers differ in digits only
    for row in kept:
        data = sim.store.blobs.get(row["blob"])
        header, start = read_header(data)
        assert len(data) - start == 8 == header["body_bytes"]
        assert header["codec"] == "code8" and header["kind"] == "zo_codes"
    # Coordinator and every silo replayed the same log: bitwise-equal weights.
    coord = dict(sim.model.named_parameters())
    for worker in sim.engine.workers.values():
        for n, p in coord.items():
            assert torch.equal(worker.trainer.params[n], p), (worker.name, n)
    # Only the trainable subset moved.
    start = sim.store.get_tensors(sim.store.index.get_meta("initial_global_blob"))[0]
    assert not torch.equal(coord["tok_emb.weight"], start["tok_emb.weight"])
    assert torch.equal(coord["layers.0.attn.wq.weight"], start["layers.0.attn.wq.weight"])


def test_zo_config_errors_are_clear():
    from fedtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="strategy.zo_perturbation"):
        load_config(None, ["strategy.name=zo", "strategy.zo_perturbation=uniform"])
    with pytest.raises(ConfigError, match="strategy.zo_samples_per_round"):
        load_config(None, ["strategy.name=zo", "strategy.zo_samples_per_round=0"])


@pytest.mark.slow
def test_a_late_replica_catches_up_from_the_stored_log(tmp_path):
    from fedtrain.config import load_config
    from fedtrain.simulation.runner import build_simulation
    from fedtrain.strategies.zo import catch_up

    sim = build_simulation(
        load_config(None, ZO + ["run.rounds=4", "transport.stochastic_rounding=true"]),
        tmp_path / "zo",
        quiet=True,
    )
    sim.execute()
    store = sim.store
    names = sorted(n for n in dict(sim.model.named_parameters()) if n.startswith("tok_emb."))
    # A silo joining now: initial weights (round 0) + the codes of rounds 1..4 from the store.
    start = store.get_tensors(store.index.get_meta("initial_global_blob"))[0]
    late = [torch.nn.Parameter(start[n].clone()) for n in names]
    log = [
        store.get_tensors(store.index.round_state(r)["aggregate_blob"])[0]
        for r in store.index.committed_rounds()
    ]
    catch_up(late, log, first_round=1, run_id=sim.run_id, lr=3e-3)
    final = dict(sim.model.named_parameters())
    assert all(torch.equal(p, final[n]) for p, n in zip(late, names, strict=True))
    # ...or from a later checkpoint: round 2's weights plus rounds 3..4 of the log.
    mid = store.get_tensors(store.index.round_state(2)["global_blob"])[0]
    later = [torch.nn.Parameter(mid[n].clone()) for n in names]
    scale = catch_up(
        [torch.nn.Parameter(start[n].clone()) for n in names],
        log[:2],
        first_round=1,
        run_id=sim.run_id,
        lr=3e-3,
    )
    catch_up(later, log[2:], first_round=3, run_id=sim.run_id, lr=3e-3, scale=scale)
    assert all(torch.equal(p, final[n]) for p, n in zip(later, names, strict=True))
