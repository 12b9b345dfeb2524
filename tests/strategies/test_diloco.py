import copy

import torch

from fedtrain.aggregation.mean import StreamingMean
from fedtrain.config import TrainSection
from fedtrain.storage.runstore import RunStore
from fedtrain.strategies import DataParallel, DiLoCo


def _params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.nn.Parameter(torch.randn(8, 5, generator=g)),
        "b.bias": torch.nn.Parameter(torch.randn(7, generator=g)),
    }


def _deltas(seed: int, params) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in params.items()}


def test_outer_step_equals_torch_sgd_nesterov_reference():
    params = _params()
    ref = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    strat = DiLoCo(params, inner_steps=10, lr=0.7, momentum=0.9, nesterov=True)
    ref_opt = torch.optim.SGD(ref.values(), lr=0.7, momentum=0.9, nesterov=True)
    for r in range(4):
        delta = _deltas(100 + r, params)
        strat.step(delta, r + 1)
        for n, p in ref.items():
            p.grad = delta[n].clone()
        ref_opt.step()
        for n in params:
            assert torch.equal(params[n].detach(), ref[n].detach()), (r, n)


def test_nesterov_outer_step_hand_computed():
    # One scalar, two steps, lr 0.5, momentum 0.9, Nesterov:
    # b1 = g1, θ1 = θ0 − lr·(g1 + μ·b1); b2 = μ·b1 + g2, θ2 = θ1 − lr·(g2 + μ·b2).
    p = {"w": torch.nn.Parameter(torch.tensor([1.0]))}
    strat = DiLoCo(p, inner_steps=1, lr=0.5, momentum=0.9)
    strat.step({"w": torch.tensor([0.2])}, 1)
    assert abs(p["w"].item() - (1.0 - 0.5 * (0.2 + 0.9 * 0.2))) < 1e-7  # 0.81
    strat.step({"w": torch.tensor([-0.1])}, 2)
    b2 = 0.9 * 0.2 - 0.1
    assert abs(p["w"].item() - (0.81 - 0.5 * (-0.1 + 0.9 * b2))) < 1e-7


def test_fedavg_with_identical_silos_reproduces_the_silo_weights():
    params = _params()
    old = {n: p.detach().clone() for n, p in params.items()}
    silo = {n: old[n] + torch.randn(old[n].shape) * 0.05 for n in old}  # a silo's θ_i
    strat = DiLoCo.fedavg(params, inner_steps=10)
    agg = StreamingMean()
    for _ in range(3):  # three identical silos
        agg.add({n: old[n] - silo[n] for n in old}, strat.weight({"tokens": 1000}))
    strat.step(agg.mean(), 1)
    for n in params:
        # θ_old − (θ_old − θ_i) is exact only up to float rounding: allow a few ulps.
        ulp = torch.finfo(torch.float32).eps * old[n].abs().max().item()
        torch.testing.assert_close(params[n].detach(), silo[n], rtol=0, atol=4 * ulp)


def test_zero_token_silo_has_no_influence():
    params = _params()
    strat = DiLoCo(params, inner_steps=10)
    good = _deltas(1, params)
    wild = {n: torch.full_like(t, 1e3) for n, t in _deltas(2, params).items()}
    with_zero, without = StreamingMean(), StreamingMean()
    with_zero.add(good, strat.weight({"tokens": 512}))
    with_zero.add(wild, strat.weight({"tokens": 0}))
    without.add(good, strat.weight({"tokens": 512}))
    a, b = with_zero.mean(), without.mean()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_equal_weighting_ignores_tokens():
    strat = DiLoCo(_params(), inner_steps=1, weighting="equal")
    assert strat.weight({"tokens": 0}) == strat.weight({"tokens": 99}) == 1.0


def test_momentum_state_round_trips_through_a_checkpoint(tmp_path):
    params = _params()
    strat = DiLoCo(params, inner_steps=10)
    for r in range(3):
        strat.step(_deltas(r, params), r + 1)
    outer, meta = strat.state_tensors()
    assert set(outer) == {f"{n}::momentum_buffer" for n in params}
    store = RunStore(tmp_path)
    global_blob = store.put_tensors({n: p.detach() for n, p in params.items()})
    outer_blob = store.put_tensors(outer, meta)
    saved_global, _ = store.get_tensors(global_blob)
    saved_outer, saved_meta = store.get_tensors(outer_blob)
    parts = {"global": saved_global, "outer": saved_outer}
    saved = {"outer": saved_meta}
    restored_params = {n: torch.nn.Parameter(parts["global"][n].clone()) for n in params}
    restored = DiLoCo(restored_params, inner_steps=10)
    restored.load_state_tensors(parts["outer"], saved["outer"])
    # Same next step on both: bitwise equal weights (the momentum buffer survived).
    delta = _deltas(42, params)
    strat.step(delta, 4)
    restored.step(delta, 4)
    for n in params:
        assert torch.equal(params[n].detach(), restored_params[n].detach())
    # And a fresh optimizer (no momentum) would differ: the test can fail.
    fresh_params = {n: torch.nn.Parameter(parts["global"][n].clone()) for n in params}
    DiLoCo(fresh_params, inner_steps=10).step(delta, 4)
    assert not torch.equal(fresh_params["a.weight"].detach(), params["a.weight"].detach())


def test_ddp_adamw_state_round_trips_including_step_count():
    train = TrainSection(lr=1e-2, warmup_steps=0)
    params = _params()
    ddp = DataParallel(params, train=train, total_steps=10)
    ddp.step(_deltas(0, params), 1)
    tensors, meta = ddp.state_tensors()
    clone_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    clone = DataParallel(clone_params, train=train, total_steps=10)
    clone.load_state_tensors(copy.deepcopy(tensors), meta)
    assert clone.steps_taken == 1
    d = _deltas(1, params)
    ddp.step(d, 2)
    clone.step(d, 2)
    assert all(torch.equal(params[n].detach(), clone_params[n].detach()) for n in params)
