"""Tests for models.py: shapes on odd sizes, gradients, determinism, registry errors, memory formats,
autocast, torch.compile, checkpoint round trips, and the scAG / NAC blocks against their definitions.
The registry-wide tests run over every name, the smp models (U-Net++, FPN, MAnet) included; what only
the smp models have is in test_models_smp.py."""
import json

import pytest
import torch
import torch.nn.functional as F

from models import MODELS, NAC, ScAG, build_model, check_trainable_size, pad_to_multiple
from utils import ToothSegError

BASE = 8  # small widths keep the suite fast; the structure is the same as at base 32
NAMES = sorted(MODELS)
UNET_NAMES = ["nac", "scag", "unet"]  # ToothSeg's own U-Nets; the rest wrap segmentation_models_pytorch


def small_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, base_channels=BASE, **kwargs)


def open_nac_gamma(model: torch.nn.Module) -> None:
    """NAC's last BN gamma starts at zero (block = identity), which blocks gradient to its branches
    until gamma has moved; give it a value so the whole block is exercised."""
    if isinstance(model.bottleneck, NAC):
        torch.nn.init.uniform_(model.bottleneck.project_bn.weight, 0.5, 1.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 1, 37, 83), (2, 1, 64, 128)])
def test_output_shape_matches_input_on_any_size(name, shape):
    model = small_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("name", NAMES)
def test_padding_is_replicate_and_crop_is_exact(name):
    model = small_model(name).eval()
    multiple = model.size_multiple
    assert multiple == (16 if name in UNET_NAMES else 32)  # four 2x poolings; a ResNet encoder's stride 32
    x = torch.randn(1, 1, 37, 83)
    height, width = -(-37 // multiple) * multiple, -(-83 // multiple) * multiple
    manually_padded = F.pad(x, (0, width - 83, 0, height - 37), mode="replicate")
    zero_padded = F.pad(x, (0, width - 83, 0, height - 37))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(manually_padded)[..., :37, :83])
        assert not torch.allclose(model(x), model(zero_padded)[..., :37, :83])  # the padding does matter
    assert pad_to_multiple(x).shape[-2:] == (48, 96)
    assert pad_to_multiple(x, 32).shape[-2:] == (64, 96)
    assert pad_to_multiple(manually_padded, multiple) is manually_padded  # already a multiple: untouched


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    model = small_model(name).train()
    open_nac_gamma(model)
    x, target = torch.randn(2, 1, 32, 48), torch.randn(2, 1, 32, 48)
    F.mse_loss(model(x), target).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic(name):
    model = small_model(name).eval()
    x = torch.randn(1, 1, 40, 72)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ToothSegError, match=r"^unknown model 'foo'; valid: fpn, manet, nac, scag, unet, unetpp$"):
        build_model("foo")


def test_bad_constructor_args_are_one_line_errors():
    with pytest.raises(ToothSegError, match=r"'unet' does not take bogus; it accepts in_channels, .*bilinear"):
        build_model("unet", bogus=1)
    with pytest.raises(ToothSegError, match="base_channels must be a positive integer, got 0"):
        build_model("scag", base_channels=0)
    with pytest.raises(ToothSegError, match=r"'fpn' does not take gate_reduction; it accepts in_channels, .*encoder_name"):
        build_model("fpn", gate_reduction=8)
    with pytest.raises(ToothSegError, match="out_channels must be a positive integer, got 0"):
        build_model("unetpp", out_channels=0)


@pytest.mark.parametrize("name", UNET_NAMES)
def test_transposed_conv_variant(name):
    model = small_model(name, bilinear=False).eval()
    assert isinstance(model.decoder.up1.upsample, torch.nn.ConvTranspose2d)
    assert model.encoder.down4.convs[1].conv.out_channels == BASE * 16  # no halving without bilinear
    with torch.no_grad():
        assert model(torch.randn(1, 1, 37, 83)).shape == (1, 1, 37, 83)


@pytest.mark.parametrize("name", NAMES)
def test_channel_variants(name):
    model = small_model(name, in_channels=3, out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 33, 50)).shape == (2, 2, 33, 50)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_matches_nchw(name):
    model = small_model(name).eval()
    open_nac_gamma(model)
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_runs_and_stays_close(name):
    model = small_model(name).eval()
    open_nac_gamma(model)
    x = torch.randn(1, 1, 21, 35)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_graph_breaks(name):
    # fullgraph=True fails on any graph break, i.e. on data-dependent Python control flow in forward.
    model = small_model(name).eval()
    x = torch.randn(1, 1, 21, 35)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_config_rebuilds_the_same_model(name, tmp_path):
    model = small_model(name, in_channels=2, out_channels=3, bilinear=False).eval()
    assert model.name == name
    checkpoint = tmp_path / "model.pt"
    # JSON round trip proves the config holds plain types only.
    torch.save({"model_name": model.name, "model_args": json.loads(json.dumps(model.config)),
                "model": model.state_dict()}, checkpoint)
    ckpt = torch.load(checkpoint, weights_only=True)
    rebuilt = build_model(ckpt["model_name"], **ckpt["model_args"]).eval()
    rebuilt.load_state_dict(ckpt["model"])  # strict: same architecture, same names
    x = torch.randn(1, 2, 32, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_parameter_names_show_encoder_decoder_head_and_transfer_across_models():
    models = {name: small_model(name) for name in NAMES}
    for model in models.values():
        assert [n for n, _ in model.named_children()] == ["encoder", "bottleneck", "decoder", "head"]
    states = {name: model.state_dict() for name, model in models.items()}
    encoder_keys = {k: v.shape for k, v in states["unet"].items() if k.startswith("encoder.")}
    assert "encoder.stem.0.conv.weight" in encoder_keys and "encoder.down4.convs.1.bn.weight" in encoder_keys
    for name in ("scag", "nac"):
        # Every weight of a pretrained plain U-Net has a same-named, same-shaped home in the others.
        assert {k: states[name][k].shape for k in states["unet"]} == {k: v.shape for k, v in states["unet"].items()}
        assert {f"decoder.gate{i}.channel_expand.weight" for i in range(1, 5)} <= set(states[name])
    assert encoder_keys and not any(k.startswith("decoder.gate") for k in states["unet"])
    assert "bottleneck.project_bn.weight" in states["nac"] and "head.conv.weight" in states["nac"]


# ----------------------------------------------------------------------------------------------
# The blocks against their definitions (models.py docstrings)
# ----------------------------------------------------------------------------------------------
def test_scag_output_is_x_times_spatial_times_channel_gate():
    torch.manual_seed(1)
    gate = ScAG(skip_channels=6, gate_channels=10, reduction=2)  # g wider than x on purpose
    x, g = torch.randn(2, 6, 12, 9), torch.randn(2, 10, 12, 9)

    def spatial_logits(t, proj, conv):
        descriptor = torch.cat([t.mean(1, keepdim=True), t.max(1, keepdim=True).values,
                                F.conv2d(t, proj.weight, proj.bias)], dim=1)
        return F.conv2d(descriptor, conv.weight, conv.bias, padding=3)

    def channel_code(t, w1):
        avg, peak = t.mean((2, 3)), t.flatten(2).max(2).values
        return F.relu(F.linear(avg, w1.weight, w1.bias)) + F.relu(F.linear(peak, w1.weight, w1.bias))

    a_s = torch.sigmoid(spatial_logits(x, gate.spatial_proj_x, gate.spatial_conv_x)
                        + spatial_logits(g, gate.spatial_proj_g, gate.spatial_conv_g))
    hidden = channel_code(x, gate.channel_reduce_x) + channel_code(g, gate.channel_reduce_g)
    a_c = torch.sigmoid(F.linear(hidden, gate.channel_expand.weight, gate.channel_expand.bias))
    assert a_s.shape == (2, 1, 12, 9) and a_c.shape == (2, 6)
    with torch.no_grad():
        torch.testing.assert_close(gate(x, g), x * a_s * a_c[:, :, None, None])


def make_nac(channels=16, dilations=(1, 2, 3, 5)):
    torch.manual_seed(2)
    nac = NAC(channels, dilations, reduction=4)
    for module in nac.modules():  # non-trivial BN statistics so eval mode is not a plain pass-through
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return nac


def test_nac_matches_its_definition():
    nac = make_nac().eval()
    torch.nn.init.uniform_(nac.project_bn.weight, 0.5, 1.5)
    assert [b.conv.dilation for b in nac.branches] == [(1, 1), (2, 2), (3, 3), (5, 5)]
    x = torch.randn(2, 16, 10, 14)
    with torch.no_grad():
        branches = [b.relu(b.bn(b.conv(x))) for b in nac.branches]
        pooled = torch.stack(branches).sum(0).mean((2, 3))
        logits = nac.select.expand(F.relu(nac.select.reduce(pooled))).view(2, 4, 16)
        a = logits.softmax(dim=1)
        fused = sum(a[:, k, :, None, None] * branches[k] for k in range(4))
        expected = x + nac.project_bn(nac.project(fused))
        torch.testing.assert_close(nac(x), expected)


def test_nac_branch_weights_are_a_softmax_over_branches():
    model = small_model("nac").eval()
    captured = []
    model.bottleneck.select.register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 48))
    weights = captured[0]
    deepest = BASE * 16 // 2
    assert weights.shape == (2, 4, deepest)
    assert (weights > 0).all() and (weights < 1).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, deepest))
    assert weights.std(dim=1).max() > 0  # input-dependent, not a constant 1/K


@pytest.mark.parametrize("train", [True, False])
def test_nac_starts_as_identity(train):
    nac = make_nac().train(train)
    assert torch.count_nonzero(nac.project_bn.weight) == 0
    x = torch.randn(2, 16, 10, 14, requires_grad=True)
    y = nac(x)
    assert torch.equal(y, x)
    y.square().sum().backward()
    # The zero gamma is itself trainable, so the block can open up from the first step.
    assert nac.project_bn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", UNET_NAMES)
def test_deep_supervision_adds_training_outputs_and_changes_no_prediction(name):
    deep = small_model(name, deep_supervision=True)
    open_nac_gamma(deep)
    x = torch.randn(2, 1, 37, 83)
    logits, aux = deep.train()(x)
    assert logits.shape == x.shape and [a.shape for a in aux] == [x.shape] * 3
    assert [h.conv.in_channels for h in deep.aux_heads] == [BASE * 4, BASE * 2, BASE]  # up1..up3's widths
    # In eval mode the extra heads are out of the way: the same weights without them predict the same.
    plain = small_model(name)
    state = {k: v for k, v in deep.state_dict().items() if not k.startswith("aux_heads.")}
    plain.load_state_dict(state)  # strict: everything but the auxiliary heads is shared
    with torch.no_grad():
        assert torch.equal(deep.eval()(x), plain.eval()(x))
    assert build_model(name, **deep.config).deep_supervision


def test_deep_supervision_is_refused_by_the_smp_models_in_one_line():
    with pytest.raises(ToothSegError, match="'fpn' does not take deep_supervision"):
        build_model("fpn", deep_supervision=True)


@pytest.mark.parametrize("name", NAMES)
def test_check_trainable_size_refuses_exactly_what_batchnorm_cannot_train(name):
    """At a batch of one, the sizes the check refuses are those whose training step fails, and no others."""
    model = build_model(name, base_channels=4).train()
    for size in [(16, 16), (32, 32), (48, 32), (16, 48), (64, 64)]:
        try:
            model(torch.randn(1, 1, *size))
            trains = True
        except ValueError:
            trains = False
        try:
            check_trainable_size(model, size, 1, "--window")
            accepted = True
        except ToothSegError as error:
            accepted = False
            assert str(error).startswith("--window at --batch-size 1: ") and "--batch-size 2" in str(error)
        assert accepted == trains, size
        check_trainable_size(model, size, 2, "--window")  # two images give BatchNorm two values
