"""The segmentation_models_pytorch models of the registry (unetpp, fpn, manet): ToothSeg's parameter names
over smp's own computation, how base_channels / bilinear / encoder_name map onto smp, weight transfer and
encoder freezing by name, and one run through MIM pretraining, fine-tuning (sliding windows, bf16) and eval."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base.heads import SegmentationHead

import eval as eval_script
import finetune_seg
import fullimage_pretrain
import mim_pretrain
from checkpoints import ModelSpec, TrainingState, load_pretrained, open_checkpoint, save_checkpoint
from models import ENCODER_PREFIXES, MODELS, SMPModel, build_model
from phantom import generate_panoramic
from utils import ToothSegError, write_png

SMP_NAMES = ["fpn", "manet", "unetpp"]
SMP_CLASSES = {"unetpp": smp.UnetPlusPlus, "fpn": smp.FPN, "manet": smp.MAnet}


def built(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, **kwargs)


def test_registry_holds_the_smp_models():
    assert sorted(n for n, cls in MODELS.items() if issubclass(cls, SMPModel)) == SMP_NAMES
    assert smp.__version__ == "0.6.0"  # the version requirements.txt pins and README names


@pytest.mark.parametrize("name", SMP_NAMES)
@pytest.mark.parametrize("out_channels", [1, 5])
def test_one_input_channel_k_outputs_at_pipeline_sizes(name, out_channels):
    model = built(name, out_channels=out_channels).eval()  # registry defaults: base 32, resnet18
    with torch.no_grad():
        for height, width in [(160, 320), (96, 208)]:  # 96 x 208 is a multiple of 16, not of 32
            assert model(torch.randn(1, 1, height, width)).shape == (1, out_channels, height, width)
    assert model.config == dict(in_channels=1, out_channels=out_channels, base_channels=32, bilinear=True,
                                encoder_name="resnet18")


@pytest.mark.parametrize("name", SMP_NAMES)
def test_parameter_names_are_encoder_decoder_head(name):
    model = built(name, out_channels=3)
    assert [n for n, _ in model.named_children()] == ["encoder", "bottleneck", "decoder", "head"]
    keys = list(model.state_dict())
    assert keys and all(k.startswith(("encoder.", "decoder.", "head.")) for k in keys)
    assert {"encoder.conv1.weight", "encoder.layer4.1.conv2.weight", "head.0.weight", "head.0.bias"} <= set(keys)
    assert not any("segmentation_head" in k or "classification_head" in k for k in keys)
    assert isinstance(model.head, SegmentationHead) and model.head[0].out_channels == 3
    assert model.encoder.conv1.in_channels == 1


@pytest.mark.parametrize("name", SMP_NAMES)
@pytest.mark.parametrize("bilinear", [True, False])
def test_computes_what_the_smp_model_computes(name, bilinear):
    """At base 32 the decoder widths are smp's defaults: smp's own model with only the interpolation set
    takes our weights under its names (strict), and gives the same output on a multiple-of-32 input."""
    ours = built(name, out_channels=2, bilinear=bilinear).eval()
    theirs = SMP_CLASSES[name](encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=2,
                               decoder_interpolation="bilinear" if bilinear else "nearest").eval()
    renamed = {k.replace("head.", "segmentation_head.", 1) if k.startswith("head.") else k: v
               for k, v in ours.state_dict().items()}
    theirs.load_state_dict(renamed)  # strict: same modules, same shapes
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("name", SMP_NAMES)
def test_bilinear_chooses_the_decoder_upsampling(name):
    modes = {flag: {m.interpolation_mode for m in built(name, bilinear=flag).decoder.modules()
                    if hasattr(m, "interpolation_mode")} for flag in (True, False)}
    assert modes == {True: {"bilinear"}, False: {"nearest"}}


def test_base_channels_sets_the_decoder_width_only():
    for name in SMP_NAMES:
        narrow, wide = built(name, base_channels=8), built(name, base_channels=32)
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        assert count(narrow.encoder) == count(wide.encoder)  # the ResNet's widths
        assert count(narrow.decoder) < count(wide.decoder)  # MAnet's PAB keeps two 3x3 convs at the encoder's 512
    assert built("unetpp", base_channels=8).head[0].in_channels == 4  # decoder base*(8, 4, 2, 1, 1/2)
    assert built("manet", base_channels=8).decoder.center.pab_channels == 16
    fpn = {base: built("fpn", base_channels=base).decoder for base in (4, 12, 32)}
    assert [d.p5.out_channels for d in fpn.values()] == [32, 96, 256]
    # smp's GroupNorm has 32 groups, so the segmentation width rounds base*4 up to a multiple of 32.
    assert [d.seg_blocks[0].block[0].block[1].num_channels for d in fpn.values()] == [32, 64, 128]


def test_encoder_choice_and_one_line_errors():
    model = built("unetpp", encoder_name="resnet34")
    assert len(model.encoder.layer3) == 6 and model.config["encoder_name"] == "resnet34"
    rebuilt = build_model("unetpp", **json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())  # strict
    with pytest.raises(ToothSegError, match=r"^model 'fpn': unknown encoder_name 'resnet7'; e\.g\. resnet18") as err:
        build_model("fpn", encoder_name="resnet7")
    assert "\n" not in str(err.value)
    with pytest.raises(ToothSegError, match=r"^model 'unetpp' with encoder_name 'mit_b0': .*not support") as err:
        build_model("unetpp", encoder_name="mit_b0")
    assert "\n" not in str(err.value)
    with pytest.raises(ToothSegError, match=r"'manet' does not take encoder_weights; it accepts .*encoder_name"):
        build_model("manet", encoder_weights="imagenet")  # random initialisation only: nothing is downloaded


@pytest.mark.parametrize("name", SMP_NAMES)
def test_builds_on_the_default_device(name):
    """Under `with torch.device("meta")` (how benchmarks/throughput.py counts FLOPs) every weight is a meta
    tensor, smp's re-made first conv included, so a backward pass on shapes alone works."""
    with torch.device("meta"):
        model = build_model(name, base_channels=4)
        image = torch.empty(1, 1, 32, 64)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model(image).sum().backward()
    assert model.encoder.conv1.weight.grad.device.type == "meta"


@pytest.mark.parametrize("name", SMP_NAMES)
def test_encoder_prefixes_select_exactly_the_encoder(name):
    model = built(name)
    frozen = {n for n, _ in model.named_parameters() if n.startswith(ENCODER_PREFIXES)}
    assert frozen == {f"encoder.{n}" for n, _ in model.encoder.named_parameters()} and len(frozen) > 50


@pytest.mark.parametrize("name", SMP_NAMES)
def test_init_from_other_out_channels_loads_all_but_the_head(name, tmp_path):
    source = built(name, base_channels=8, out_channels=3)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = build_model(name, base_channels=8, out_channels=1)
    head_before = {k: v.clone() for k, v in target.head.state_dict().items()}
    report = load_pretrained(target, tmp_path / "weights.pt")
    assert report.mismatched == ["head.0.weight", "head.0.bias"] and report.missing == [] and report.unused == []
    loaded, expected = target.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in report.matched)
    assert {k.removeprefix("head.") for k in expected if k.startswith("head.")} == set(head_before)
    assert all(torch.equal(target.head.state_dict()[k], v) for k, v in head_before.items())


# ----------------------------------------------------------------------------------------------
# Through the scripts, on a phantom folder pair (images 96 x 192, network 64 x 128, tiny decoder)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("smp_phantom")
    for seed in range(12):
        image, mask = generate_panoramic(300 + seed, 96, 192)
        write_png(root / "images" / f"case{seed:02d}.png", image)
        write_png(root / "masks" / f"case{seed:02d}.png", mask)
    return root


def tiny(root, out, *extra: str) -> list[str]:
    return ["--images-dir", str(root / "images"), "--checkpoint-dir", str(out), "--img-height", "64",
            "--img-width", "128", "--base-channels", "8", "--batch-size", "4", "--num-workers", "0", "--cpu",
            "--epochs", "1", *extra]


def test_mim_finetune_eval_chain_with_an_smp_model(phantom_pairs, tmp_path, capsys):
    """MIM-pretrain fpn (its head is the reconstruction head), turn the checkpoint into a 3-class one, fine-tune
    from it (bf16 autocast, channels_last, 48 x 96 windows: multiples of 16, not 32, with a frozen encoder), eval."""
    mim_pretrain.main(tiny(phantom_pairs, tmp_path / "mim", "--model-type", "fpn", "--val-ratio", "0.2",
                           "--min-block-size", "8", "--max-block-size", "24"))
    mim = open_checkpoint(tmp_path / "mim" / "best.pth", ("mim",))
    assert mim.model == ModelSpec("fpn", dict(in_channels=1, out_channels=1, base_channels=8, bilinear=True,
                                              encoder_name="resnet18"))
    three = build_model("fpn", **{**mim.model.args, "out_channels": 3})
    three.load_state_dict({k: v for k, v in mim.state.weights.items() if not k.startswith("head.")}, strict=False)
    save_checkpoint(tmp_path / "three.pth", replace(mim, kind="segmentation", model=ModelSpec("fpn", three.config),
                                                    state=TrainingState(three.state_dict())))
    capsys.readouterr()

    finetune_seg.main(tiny(phantom_pairs, tmp_path / "ft", "--masks-dir", str(phantom_pairs / "masks"),
                           "--val-ratio", "0.2", "--test-ratio", "0.2", "--model-type", "fpn", "--init-from",
                           str(tmp_path / "three.pth"), "--freeze-encoder-epochs", "1", "--amp", "bf16",
                           "--window", "48", "96"))
    assert "mismatched 2 (head.0.weight, head.0.bias), unused 0" in capsys.readouterr().out
    ft = open_checkpoint(tmp_path / "ft" / "best.pth", ("segmentation",))
    assert ft.model.name == "fpn" and ft.model.args["out_channels"] == 1 and ft.precision.dtype == "bfloat16"
    assert ft.data.window == (48, 96) and ft.epoch == 1
    after, before = ft.state.weights, mim.state.weights
    encoder = [k for k in after if k.startswith("encoder.") and k.endswith(".weight")]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)  # transferred, then frozen
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("decoder.") and k.endswith(".weight"))

    eval_script.main(["--checkpoint", str(tmp_path / "ft" / "best.pth"), "--out-dir", str(tmp_path / "eval"),
                      "--cpu", "--workers", "0"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["model"] == "fpn" and summary["n_images"] > 0 and 0 <= summary["metrics"]["dice"]["mean"] <= 1

    # An ensemble with a UNet predicting the whole input: the summary records each member, not the first one's
    # architecture and window as if it were all of them.
    unet = build_model("unet", base_channels=8)
    save_checkpoint(tmp_path / "unet.pth", replace(ft, model=ModelSpec("unet", unet.config), data=replace(ft.data, window=None),
                                                    state=TrainingState(unet.state_dict())))
    eval_script.main(["--checkpoint", str(tmp_path / "ft" / "best.pth"), str(tmp_path / "unet.pth"), "--out-dir",
                      str(tmp_path / "eval2"), "--cpu", "--workers", "0"])
    summary = json.loads((tmp_path / "eval2" / "summary.json").read_text())
    assert summary["model"] == "fpn + unet" and summary["window"] is None and summary["model_args"] is None
    assert [(m["model"], m["window"], m["checkpoint"]) for m in summary["members"]] == [
        ("fpn", [48, 96], str(tmp_path / "ft" / "best.pth")), ("unet", None, str(tmp_path / "unet.pth"))]


def test_fullimage_pretraining_builds_an_smp_model(phantom_pairs, tmp_path):
    fullimage_pretrain.main(tiny(phantom_pairs, tmp_path / "fi", "--model-type", "unetpp", "--val-ratio", "0.2"))
    ckpt = open_checkpoint(tmp_path / "fi" / "best.pth", ("fullimage",))
    assert ckpt.model.name == "unetpp" and type(ckpt.build_model()).__name__ == "SMPUnetPlusPlus"
    assert all(k.startswith(("encoder.", "decoder.", "head.")) for k in ckpt.state.weights)


def test_encoder_flag_reaches_the_model_spec(tmp_path):
    import finetune_seg
    from engine import model_kwargs

    args = finetune_seg.parse_args(["--images-dir", str(tmp_path), "--model-type", "fpn", "--encoder", "resnet34"])
    assert finetune_seg.resolve_model(args).args["encoder_name"] == "resnet34"
    assert model_kwargs(args)["encoder_name"] == "resnet34"
    assert "encoder_name" not in model_kwargs(finetune_seg.parse_args(["--images-dir", str(tmp_path)]))


@pytest.mark.parametrize("other", ["scag", "fpn"])
def test_another_model_type_from_a_checkpoint_keeps_its_width(tmp_path, other):
    """--init-from a base-4 UNet's weights with --model-type scag built a base-32 model and matched nothing."""
    from types import SimpleNamespace

    import finetune_seg
    from checkpoints import ModelSpec

    saved = SimpleNamespace(model=ModelSpec("unet", {"base_channels": 4, "bilinear": False, "deep_supervision": True}))
    args = finetune_seg.parse_args(["--images-dir", str(tmp_path), "--model-type", other])
    spec = finetune_seg.resolve_model(args, resumed=saved)
    assert spec.name == other and spec.args["base_channels"] == 4 and spec.args["bilinear"] is False
    # the weights' deep supervision comes along where the architecture takes it (the own U-Nets; --help and the
    # README say so), and not into an smp model, which has none
    assert spec.args.get("deep_supervision") is (True if other == "scag" else None)
