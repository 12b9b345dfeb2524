"""Run under `torchrun --nproc-per-node 2 sharded_check.py [adamw|muon]`: a ShardedTrainer
against a single-process SiloTrainer on the same batches, with that inner optimizer. Prints one
JSON line of max differences from rank 0."""

from __future__ import annotations

import json
import sys
import tempfile

import torch
import torch.distributed as dist

from fedtrain.client.sharded import ShardedTrainer, exit_rank
from fedtrain.client.trainer import SiloTrainer
from fedtrain.config import config_from_dict
from fedtrain.data.stream import TokenStream
from fedtrain.models.llama import build_model
from fedtrain.models.presets import PRESETS
from tests.conftest import tiny_config_dict


def _shutdown() -> None:
    # Both ranks meet before tearing gloo down (as the daemon does), then exit past C++ static
    # teardown, where a loaded machine sometimes aborted a rank after its work was done.
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    optimizer = sys.argv[1] if len(sys.argv) > 1 else "adamw"
    cfg = config_from_dict(tiny_config_dict(train={"optimizer": optimizer})).train
    tokens = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    model = lambda: build_model(PRESETS["tiny"], 256, 0)  # noqa: E731
    sh = ShardedTrainer("a", model(), TokenStream(tokens, 0, "a"), cfg, 100)
    if dist.get_rank() != 0:
        sh.follow()
        _shutdown()
        return

    def diff(a: dict, b: dict) -> float:
        return max(float((a[n] - b[n].detach()).abs().max()) for n in a)

    ref = SiloTrainer("a", model(), TokenStream(tokens, 0, "a"), cfg, 100)
    out: dict = {"optimizer": optimizer}
    s1, s0 = sh.train(5), ref.train(5)
    out["loss"] = abs(s1.mean_loss - s0.mean_loss)
    g1, g0 = sh.pseudo_gradient(), ref.pseudo_gradient()
    out["pseudo_grad"] = diff(g1, g0)
    names = list(g0)
    delta = {n: -0.5 * g0[n] for n in names}
    for trainer in (sh, ref):
        trainer.apply_global_update(delta, names[:3], 0.0)
        trainer.apply_global_update(delta, names[3:], 0.5)
    out["apply"] = diff(sh.full_weights(), ref.params)
    out["anchor"] = diff(sh.anchor, ref.anchor)
    with tempfile.TemporaryDirectory() as d:
        sh.save_shards(d)
        saved = {k: v.clone() for k, v in sh.state_tensors()[0].items()}, sh.state_tensors()[1]
        ref_t, ref_m = ref.state_tensors()
        ref_saved = {k: v.clone() for k, v in ref_t.items()}, ref_m
        sh.train(3)
        ref.train(3)
        sh.load_shards(d)
        sh.load_state_tensors(*saved)
        ref.load_state_tensors(*ref_saved)
    sh.train(4)
    ref.train(4)
    out["after_reload"] = diff(sh.full_weights(), ref.params)
    out["step"] = [sh.step, ref.step]
    windows = tokens[: 33 * 4].view(4, 33).long()
    out["eval"] = abs(sh.loss_on(windows) - ref.loss_on(windows))
    sh.set_global({n: p.detach() for n, p in ref.params.items()})
    out["set_global"] = diff(sh.full_weights(), ref.params)
    sh.stop_followers()
    print(json.dumps(out), flush=True)
    _shutdown()


if __name__ == "__main__":
    main()
    exit_rank(0)
