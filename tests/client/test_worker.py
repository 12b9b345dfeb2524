import torch

from fedtrain.client import SiloTrainer
from fedtrain.client.worker import SiloWorker
from fedtrain.config import TrainSection, TransportSection
from fedtrain.data import TokenStream
from fedtrain.models import PRESETS, build_model
from fedtrain.protocol.work import TrainWork
from fedtrain.storage.runstore import RunStore
from fedtrain.transport import decode_payload, encode_payload


def _worker(ef: bool = True) -> SiloWorker:
    model = build_model(PRESETS["tiny"], 256, 0)
    stream = TokenStream(
        torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)),
        seed=0,
        stream_id="silo0",
    )
    trainer = SiloTrainer(
        "silo0",
        model,
        stream,
        TrainSection(batch_size=2, seq_len=16, warmup_steps=0),
        total_steps=10,
    )
    return SiloWorker(
        trainer, run_id="r", seed=0, transport=TransportSection(codec="int4", error_feedback=ef)
    )


def _broadcast(worker: SiloWorker, rnd: int, accepted: list[str]) -> bytes:
    zeros = {n: torch.zeros_like(p) for n, p in worker.trainer.params.items()}
    return encode_payload(
        zeros,
        codec="int4",
        kind="update",
        run_id="r",
        round=rnd,
        sender="coordinator",
        meta={"accepted": accepted},
    )


def test_residual_advances_only_when_the_broadcast_acknowledges_this_silo():
    w = _worker()
    result = w.work(1, TrainWork(steps=2))
    sent = decode_payload(result.payload).tensors
    assert w.feedback.residual == {}  # staged only
    w.receive(_broadcast(w, 1, accepted=["silo1"]))  # our update did not count
    assert w.feedback.residual == {}
    w.work(2, TrainWork(steps=2))
    w.receive(_broadcast(w, 2, accepted=["silo0"]))  # acknowledged
    assert set(w.feedback.residual) == set(sent)
    assert any(t.abs().sum() > 0 for t in w.feedback.residual.values())


def test_failed_round_without_broadcast_discards_the_staged_residual():
    w = _worker()
    w.work(1, TrainWork(steps=1))
    w.receive(None)
    assert w.feedback.residual == {} and not w.feedback.has_pending


def test_silo_state_survives_a_save_and_restore(tmp_path):
    w = _worker()
    w.work(1, TrainWork(steps=2))
    w.receive(_broadcast(w, 1, accepted=["silo0"]))
    _broadcast_pending = w.work(2, TrainWork(steps=1))  # staged, awaiting the ack
    store = RunStore(tmp_path)
    tensors, meta = store.get_tensors(store.put_tensors(*w.state_tensors()))
    fresh = _worker()
    fresh.load_state_tensors(tensors, meta)
    assert fresh.trainer.step == w.trainer.step == 3
    assert fresh.feedback.has_pending
    for n, t in w.feedback.pending.items():
        assert torch.equal(fresh.feedback.pending[n], t)
    for n, p in w.trainer.params.items():
        assert torch.equal(fresh.trainer.params[n], p) and torch.equal(
            fresh.trainer.anchor[n], w.trainer.anchor[n]
        )
    for n, t in w.feedback.residual.items():
        assert torch.equal(fresh.feedback.residual[n], t)


def test_reply_is_the_compensated_pseudo_gradient_through_the_codec():
    w = _worker(ef=False)
    result = w.work(1, TrainWork(steps=3))
    p = decode_payload(result.payload)
    assert p.codec == "int4" and p.meta["steps"] == 3 and p.meta["tokens"] == 3 * 2 * 16
    delta = w.trainer.pseudo_gradient()
    for n, t in p.tensors.items():
        block_max = delta[n].abs().max().item()
        assert (t - delta[n]).abs().max().item() <= block_max / 14 * 1.01 + 1e-12
