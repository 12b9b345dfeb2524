import torch

from fedtrain.transport import get_codec
from fedtrain.transport.feedback import ErrorFeedback


def _send(ef: ErrorFeedback, g: dict, codec) -> dict:
    u = ef.compensate(g)
    c = {n: codec.roundtrip(t) for n, t in u.items()}
    ef.stage(u, c)
    return c


def test_error_feedback_telescopes():
    # Σ c_t = Σ g_t − e_T: nothing is lost, only delayed.
    codec = get_codec("sign1")
    ef = ErrorFeedback()
    gen = torch.Generator().manual_seed(0)
    sum_g = torch.zeros(1000, dtype=torch.float64)
    sum_c = torch.zeros(1000, dtype=torch.float64)
    for _ in range(50):
        g = {"w": torch.randn(1000, generator=gen)}
        c = _send(ef, g, codec)
        ef.commit()
        sum_g += g["w"].double()
        sum_c += c["w"].double()
    assert torch.allclose(sum_c, sum_g - ef.residual["w"].double(), atol=1e-6, rtol=0)
    # The residual stays bounded (sign1 contracts) instead of growing with the sum.
    assert ef.residual["w"].norm() < 0.5 * sum_g.norm()


def test_residual_advances_only_when_acknowledged():
    codec = get_codec("int4")
    ef = ErrorFeedback()
    g = {"w": torch.linspace(-1, 1, 100)}
    _send(ef, g, codec)
    assert ef.residual == {}  # staged, not committed
    ef.discard()  # the update was dropped / rejected
    assert ef.residual == {} and not ef.has_pending
    c = _send(ef, g, codec)
    ef.commit()
    torch.testing.assert_close(ef.residual["w"], g["w"] - c["w"], rtol=0, atol=0)
    before = ef.residual["w"].clone()
    _send(ef, {"w": torch.ones(100)}, codec)
    ef.discard()
    assert torch.equal(ef.residual["w"], before)


def test_state_round_trip_drops_uncommitted():
    ef = ErrorFeedback()
    ef.residual = {"w": torch.arange(4.0)}
    _send(ef, {"w": torch.ones(4)}, get_codec("int8"))
    clone = ErrorFeedback()
    clone.load_state_dict(ef.state_dict())
    assert torch.equal(clone.residual["w"], torch.arange(4.0)) and not clone.has_pending
