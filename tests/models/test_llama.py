import torch

from fedtrain.models import PRESETS, build_model, count_parameters


def _tiny(seed: int = 0):
    return build_model(PRESETS["tiny"], 256, seed)


def test_logits_shape_and_parameter_count():
    model = _tiny()
    x = torch.randint(0, 256, (3, 17))
    assert model(x).shape == (3, 17, 256)
    # tiny preset: 4 blocks of (4·128² attention + 3·128·352 SwiGLU + 2·128 norms)
    # + 256·128 tied embedding + 128 final norm.
    expected = 4 * (4 * 128 * 128 + 3 * 128 * 352 + 2 * 128) + 256 * 128 + 128
    assert count_parameters(model) == expected


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    model = _tiny().eval()
    x = torch.randint(0, 256, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_init_is_deterministic_in_the_seed():
    a, b, c = _tiny(7).state_dict(), _tiny(7).state_dict(), _tiny(8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.wq.weight"], c["layers.0.attn.wq.weight"])


def test_untied_head_and_bf16_autocast_loss_is_finite():
    model = build_model(PRESETS["tiny"], 300, 0, tie=False)
    assert "head.weight" in dict(model.named_parameters())
    x = torch.randint(0, 300, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(x[:, :-1], x[:, 1:])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # An untrained model predicts roughly uniformly: loss ≈ ln(vocab).
    assert abs(float(loss.detach()) - torch.log(torch.tensor(300.0)).item()) < 0.3


def test_too_long_sequence_is_a_clear_error():
    model = _tiny()
    try:
        model(torch.zeros(1, PRESETS["tiny"].max_seq_len + 1, dtype=torch.long))
    except ValueError as e:
        assert "max_seq_len" in str(e)
    else:
        raise AssertionError("expected ValueError")
