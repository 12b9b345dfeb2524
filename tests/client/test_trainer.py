import copy

import torch

from fedtrain.client import SiloTrainer
from fedtrain.config import TrainSection
from fedtrain.data import TokenStream
from fedtrain.models import PRESETS, build_model
from fedtrain.optim import OptimizerFactory, lr_at


def _trainer(optimizer: OptimizerFactory | None = None, **train) -> SiloTrainer:
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainSection(**{"batch_size": 2, "seq_len": 16, "warmup_steps": 0, **train})
    return SiloTrainer(
        "s",
        build_model(PRESETS["tiny"], 256, 0),
        TokenStream(tokens, seed=0, stream_id="s"),
        cfg,
        total_steps=10,
        optimizer=optimizer,
    )


def test_an_injected_sgd_takes_exactly_the_plain_gradient_step():
    # No warm-up and a floor of 1: the schedule is the constant lr; no clipping, one micro-batch.
    t = _trainer(
        optimizer=lambda named: torch.optim.SGD([p for _, p in named], lr=0.5),
        lr=0.05,
        min_lr_ratio=1.0,
        grad_clip=0.0,
    )
    assert isinstance(t.optimizer, torch.optim.SGD)
    lr = lr_at(0, t.cfg, t.total_steps)
    assert lr == 0.05  # the trainer sets each step's lr over the factory's
    ref = copy.deepcopy(t.model)
    x, y = t.stream.batch(0, 0, 2, 16)
    ref.loss(x, y).backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    t.train(1)
    eps = torch.finfo(torch.float32).eps
    for n, p in t.params.items():
        w, g, got = before[n], grads[n], p.detach()
        # Same weights, batch and kernels give bitwise the same gradient, and plain SGD is
        # w + (-lr)·g in one fused multiply-add (one rounding): exactly torch's add with alpha.
        assert torch.equal(got, w.add(g, alpha=-lr)), n
        # The unfused w - lr·g rounds twice: within one rounding of each term of the exact value.
        plain = w - lr * g
        assert ((got - plain).abs() <= eps * ((lr * g).abs() + plain.abs())).all(), n


def test_the_default_inner_optimizer_is_adamw_from_the_config():
    t = _trainer(lr=2e-3, weight_decay=0.05)
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.05, 0.0]
    clone = t.fresh_copy()
    assert isinstance(clone.optimizer, torch.optim.AdamW) and clone.optimizer is not t.optimizer


def test_gradient_accumulation_averages_the_micro_batches():
    acc = _trainer(grad_accum=2)
    grads, stats = acc.gradient()
    assert stats.tokens == 2 * 2 * 16
    one = _trainer(grad_accum=1)
    manual = {n: torch.zeros_like(p) for n, p in one.params.items()}
    for micro in range(2):
        one.model.zero_grad()
        x, y = one.stream.batch(0, micro, 2, 16)
        one.model.loss(x, y).backward()
        for n, p in one.params.items():
            manual[n] += p.grad / 2
    for n in grads:
        torch.testing.assert_close(grads[n], manual[n], rtol=1e-5, atol=1e-7)


def test_inner_state_persists_and_pseudo_gradient_is_anchor_minus_local():
    t = _trainer(bf16=True)
    start = {n: p.detach().clone() for n, p in t.params.items()}
    stats = t.train(3)
    assert t.step == 3 and stats.steps == 3 and torch.isfinite(torch.tensor(stats.mean_loss))
    assert len(t.optimizer.state) > 0  # AdamW moments exist and stay across calls
    delta = t.pseudo_gradient()
    for n, p in t.params.items():
        assert torch.equal(delta[n], start[n] - p.detach())
    local = {n: p.detach().clone() for n, p in t.params.items()}
    t.apply_global_update({n: -d for n, d in delta.items()}, alpha=1.0)  # α=1 keeps local
    for n, p in t.params.items():
        assert torch.equal(t.anchor[n], start[n] - delta[n])
        assert torch.equal(p.detach(), local[n])
    t.apply_global_update({n: torch.zeros_like(d) for n, d in delta.items()}, alpha=0.0)
    for n, p in t.params.items():
        assert torch.equal(p.detach(), t.anchor[n])  # α=0 takes the global


def test_warmup_then_cosine_schedule():
    from fedtrain.optim import lr_at

    cfg = TrainSection(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 20) == 1e-3 / 4
    assert lr_at(3, cfg, 20) == 1e-3
    assert abs(lr_at(20, cfg, 20) - 1e-4) < 1e-12
    assert lr_at(12, cfg, 20) < lr_at(8, cfg, 20)
