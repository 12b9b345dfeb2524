"""The silo trainer sharded with FSDP2 over the silo's local processes (torchrun ranks).

Rank 0 is the *driver*: it owns the protocol side (:class:`~fedtrain.client.worker.SiloWorker`),
the full-size anchor θ̃ (last global weights) and the error-feedback state. Every other rank is a
*follower*: it holds only its shards of the weights and of the AdamW state and loops in
:meth:`ShardedTrainer.follow`, running whatever collective operation rank 0 announces. Each
public method that needs the other ranks first announces itself (one small broadcast), so
``SiloWorker`` drives a sharded trainer exactly as it drives a single-process one.

- Each inner step, rank ``r`` of ``W`` takes rows ``[r·B/W, (r+1)·B/W)`` of the same batch the
  single-process trainer would take; FSDP averages the gradients, so the update is the same
  up to summation order.
- Full weights are gathered to rank 0 only when needed (``get_model_state_dict`` with full,
  CPU-offloaded state dict options) and written back with ``set_model_state_dict`` broadcast
  from rank 0.
- Checkpoints: every rank writes its own shards (weights + AdamW) with safetensors; rank 0 also
  writes the anchor and step. Restoring needs the same number of ranks.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fedtrain.client.trainer import SiloTrainer, StepStats
from fedtrain.config import TrainSection
from fedtrain.data.stream import TokenStream
from fedtrain.models.evaluate import evaluate_loss
from fedtrain.models.llama import Llama
from fedtrain.strategies.base import optimizer_from_tensors, optimizer_to_tensors

__all__ = ["ShardedTrainer"]

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedTrainer(SiloTrainer):
    """:class:`SiloTrainer` over an FSDP2-sharded model; see the module docstring."""

    def __init__(
        self,
        name: str,
        model: Llama,
        stream: TokenStream,
        cfg: TrainSection,
        total_steps: int,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ShardedTrainer needs torch.distributed to be initialised")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if cfg.batch_size % self.world:
            raise ValueError(
                f"train.batch_size = {cfg.batch_size} does not split over {self.world} "
                "processes; choose --nproc dividing it"
            )
        self.name = name
        self.stream = stream
        self.cfg = cfg
        self.total_steps = total_steps
        # NCCL on GPUs (one per local rank), gloo on CPU; the anchor always lives in host memory.
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        # All ranks built identical weights from the run seed; rank 0 keeps them as the anchor.
        self.anchor = (
            {n: p.detach().clone() for n, p in model.named_parameters()} if self.rank == 0 else {}
        )
        model.to(self.device)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        self.model = model
        self.params = dict(model.named_parameters())
        from fedtrain.optim import inner_optimizer_factory

        self.make_optimizer = inner_optimizer_factory(cfg)
        self.optimizer = self.make_optimizer(list(self.params.items()))
        self.step = 0

    # ------------------------------------------------------------------ relay
    def _announce(self, op: str, *args: Any) -> None:
        if self.rank == 0 and self.world > 1:
            dist.broadcast_object_list([(op, args)], src=0)

    def follow(self) -> None:
        """Followers: run the operations rank 0 announces until it announces ``stop``."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            op, args = box[0]
            if op == "stop":
                return
            getattr(self, f"_op_{op}")(*args)

    def stop_followers(self) -> None:
        self._announce("stop")

    # --------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backward(self) -> float:
        total = 0.0
        rows = self.cfg.batch_size // self.world
        lo = self.rank * rows
        for micro in range(self.cfg.grad_accum):
            x, y = self.stream.batch(self.step, micro, self.cfg.batch_size, self.cfg.seq_len)
            x, y = x[lo : lo + rows].to(self.device), y[lo : lo + rows].to(self.device)
            with self._autocast():
                loss = self.model.loss(x, y)
            (loss / self.cfg.grad_accum).backward()
            total += float(loss.detach())
        mean = torch.tensor([total / self.cfg.grad_accum], device=self.device)
        if self.world > 1:
            dist.all_reduce(mean)
        return float(mean) / self.world

    def train(self, steps: int, on_step: Callable[[int], None] | None = None) -> StepStats:
        self._announce("train", steps)
        return SiloTrainer.train(self, steps, on_step)

    def _op_train(self, steps: int) -> None:
        SiloTrainer.train(self, steps)

    def gradient(self) -> tuple[dict[str, torch.Tensor], StepStats]:
        raise NotImplementedError("per-step gradients (strategy ddp) are simulation-only")

    @torch.no_grad()
    def loss_on(self, windows: torch.Tensor, batch_size: int | None = None) -> float:
        self._announce("loss_on", windows, batch_size)
        return self._op_loss_on(windows, batch_size)

    @torch.no_grad()
    def _op_loss_on(self, windows: torch.Tensor, batch_size: int | None) -> float:
        # Every rank runs the same forward passes (FSDP gathers each block in lockstep).
        loss = evaluate_loss(
            self.model,
            windows.to(self.device),
            batch_size or self.cfg.batch_size,
            bf16=self.cfg.bf16 and self.device.type == "cpu",
        )
        self.model.reshard()  # type: ignore[operator]  # FSDPModule method; root stays unsharded after a forward-only pass
        return loss

    # -------------------------------------------------------- synchronisation
    def _op_gather(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model, options=_GATHER)  # type: ignore[return-value]

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Local weights gathered to rank 0 (empty on the other ranks)."""
        self._announce("gather")
        full = self._op_gather()
        return {n: full[n] for n in self.params} if self.rank == 0 else {}

    def pseudo_gradient(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        full = self.full_weights()
        keys = list(names) if names is not None else list(self.params)
        return {n: self.anchor[n] - full[n] for n in keys}

    def _op_scatter(self, names: list[str]) -> None:
        # set_model_state_dict replaces the entries of the dict it gets: pass a fresh one.
        if self.rank == 0:
            sd = {n: self._target[n].clone() for n in names}
        else:
            sd = {}
        set_model_state_dict(self.model, sd, options=_SCATTER)  # type: ignore[arg-type]

    def _scatter(self, target: dict[str, torch.Tensor]) -> None:
        names = list(target)
        self._target = target
        self._announce("scatter", names)
        self._op_scatter(names)
        self._target = {}

    @torch.no_grad()
    def apply_global_update(
        self,
        delta: dict[str, torch.Tensor],
        names: Iterable[str] | None = None,
        alpha: float = 0.0,
    ) -> None:
        keys = list(names) if names is not None else list(delta)
        for n in keys:
            self.anchor[n].add_(delta[n])
        if alpha == 1.0:
            return
        if alpha == 0.0:
            target = {n: self.anchor[n] for n in keys}
        else:
            full = self.full_weights()
            target = {n: full[n] * alpha + self.anchor[n] * (1.0 - alpha) for n in keys}
        self._scatter(target)

    @torch.no_grad()
    def set_global(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(weights)
        if missing:
            raise KeyError(f"global weights lack parameters: {sorted(missing)[:5]}")
        self.anchor = {n: weights[n].detach().clone() for n in self.params}
        self._scatter(self.anchor)

    # ------------------------------------------------------------ checkpoints
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Rank 0's share of the state (anchor and step); shards go via :meth:`save_shards`."""
        return {f"anchor.{n}": a for n, a in self.anchor.items()}, {"step": self.step}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.anchor = {n: tensors[f"anchor.{n}"].clone() for n in self.params}
        self.step = int(meta["step"])

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its shards of weights and AdamW state (collective)."""
        self._announce("save_shards", str(directory))
        self._op_save_shards(str(directory))

    def _op_save_shards(self, directory: str) -> None:
        import json

        from safetensors.torch import save_file

        opt, meta = optimizer_to_tensors(self.optimizer, self.params)
        tensors = {
            f"local.{n}": _local(p.detach()).cpu().contiguous() for n, p in self.params.items()
        }
        tensors.update({f"opt.{k}": _local(v).cpu().contiguous() for k, v in opt.items()})
        path = Path(directory) / f"shard-{self.rank}-of-{self.world}.safetensors"
        save_file(tensors, str(path), metadata={"meta": json.dumps({**meta, "step": self.step})})
        dist.barrier()

    def load_shards(self, directory: Path) -> None:
        self._announce("load_shards", str(directory))
        self._op_load_shards(str(directory))

    @torch.no_grad()
    def _op_load_shards(self, directory: str) -> None:
        import json

        from safetensors import safe_open

        path = Path(directory) / f"shard-{self.rank}-of-{self.world}.safetensors"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} missing: the checkpoint was written by a different number of processes"
            )
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        for n, p in self.params.items():
            _local(p.data).copy_(tensors[f"local.{n}"])
        opt = {}
        for k, v in tensors.items():
            if not k.startswith("opt."):
                continue
            key = k.removeprefix("opt.")
            pname = key.rpartition("::")[0]
            p = self.params[pname]
            if isinstance(p, DTensor) and v.dim() > 0:
                v = DTensor.from_local(
                    v.to(self.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
            opt[key] = v
        optimizer_from_tensors(self.optimizer, self.params, opt, meta)
        self.step = int(meta["step"])
        dist.barrier()

    def fresh_copy(self, stream: TokenStream | None = None, step: int | None = None) -> SiloTrainer:
        raise NotImplementedError("coded shard work is not available on a sharded trainer")


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank after its process group is destroyed, skipping C++ static teardown.

    With gloo under CPU contention a rank sometimes aborts in interpreter finalization, after
    every Python exit handler has run ("terminate called without an active exception", exit
    -6), and torchrun then reports the whole job failed. Exit handlers, logging and stdio are
    flushed first, so nothing a clean exit would write is lost.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
