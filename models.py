"""2D U-Nets for ToothSeg: `UNet2D`, `UNet2D_scAG` (spatial-channel attention gates on the skips) and
`UNet2D_NAC` (neighbour-aware context at the bottleneck plus scAG); U-Net++, FPN and MAnet from
segmentation_models_pytorch (smp 0.6.0) on a ResNet encoder (`SMPModel`); and the `MODELS` registry
that the scripts' `--model-type` selects from.

Every model has the same four top-level parts, so weights move between pretraining and segmentation
by name and the parameter names say where they live:

    encoder.stem, encoder.down1..down4   feature extractor (DoubleConv stages)
    bottleneck                           identity for unet/scag, the NAC block for nac
    decoder.up1..up4 (+ decoder.gate1..gate4 for scag/nac)
    head.conv                            final 1x1 conv
    aux_heads.0..2.conv                  U-Nets with deep_supervision only: 1x1 convs on up1..up3

"Encoder" (`ENCODER_PREFIXES`, what --freeze-encoder-epochs holds fixed) means `encoder` plus `bottleneck`.

Choices worth knowing:
- Widths are base*(1, 2, 4, 8, 16). With `bilinear=True` the deepest stage and the decoder widths are
  halved, as in milesial/Pytorch-UNet, because bilinear upsampling cannot reduce channels the way a
  transposed conv does; `bilinear=False` keeps full widths and upsamples with ConvTranspose2d.
- Any input height/width works: the input is padded on the bottom/right to a multiple of 16 (four 2x
  poolings) by *replicating* the edge pixels, and the output is cropped back exactly. Replicate
  rather than zeros (which would add dark borders that shift the statistics at the image edge) and
  rather than reflect (which fails when the padding exceeds the image size).
- `deep_supervision=True` (nnU-Net's): in training, forward returns `(logits, [logits of the 1/8, 1/4
  and 1/2 decoder stages, upsampled bilinearly to the input's size])` for a loss at every resolution; in
  eval mode it returns the logits alone, so prediction, ensembles and the EMA teacher never see the extra
  heads, and a model without them computes the same logits from the same weights.
- NAC's last BatchNorm starts with gamma = 0, so the block starts as the identity and a fresh
  `UNet2D_NAC` computes what a `UNet2D_scAG` computes; the gamma learns to open the branch.
- `model.config` holds the constructor arguments as plain types and `model.name` the registry key,
  so a checkpoint's `model` section (`{"name", "args"}`, see checkpoints.py) rebuilds it with `build_model`.
  `model.size_multiple` is what forward pads to (16 for the U-Nets, the encoder's stride 32 for smp).

The smp models (`unetpp`, `fpn`, `manet`) keep the same four parts: smp's encoder is `encoder` (e.g.
encoder.layer4.1.conv2.weight), `bottleneck` is the identity, smp's decoder is `decoder` and its
`segmentation_head` is `head` (head.0.weight), so --init-from, --freeze-encoder-epochs and pretraining
treat them like the U-Nets. Random initialisation only (encoder_weights=None: nothing is downloaded).
Their arguments map onto the U-Nets' flags:
- `base_channels` sets the decoder width, and 32 gives smp's own defaults: U-Net++ and MAnet decoder
  channels base*(8, 4, 2, 1, 1/2) = (256, 128, 64, 32, 16); MAnet's PAB width base*2 = 64; FPN's pyramid
  base*8 = 256 and segmentation width base*4 = 128 (rounded up to a multiple of 32, the groups of
  smp's GroupNorm). The encoder's widths are the ResNet's and do not change with it.
- `bilinear` chooses the decoder's upsampling: bilinear (True, the scripts' default) or nearest
  (False, smp's default; --no-bilinear). smp has no transposed-convolution decoder.
- `encoder_name` is any smp encoder (`resnet18` default, `resnet34`, `efficientnet-b0`, `tu-<timm model>` ...).
- They have no deep supervision or auxiliary outputs (smp's aux_params classification head is not
  built): forward returns the logits only.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from utils import ToothSegError

# Four 2x max-poolings: spatial sizes must be divisible by 2**4.
SIZE_MULTIPLE = 16
ENCODER_PREFIXES = ("encoder.", "bottleneck.")


def check_window(window: list[int] | tuple[int, int], input_size: tuple[int, int], input_flags: str) -> None:
    """A window must tile the U-Nets' four poolings exactly and fit inside the input (`input_flags`, as the
    user gave it) it is cropped from."""
    (h, w), (height, width) = window, input_size
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        down = [max(SIZE_MULTIPLE, n - n % SIZE_MULTIPLE) for n in window]
        raise ToothSegError(f"--window {h} {w}: both sides must be multiples of {SIZE_MULTIPLE}; "
                            f"try --window {down[0]} {down[1]}")
    if h > height or w > width:
        raise ToothSegError(f"--window {h} {w}: larger than the input {input_flags}; "
                            f"choose a window within it, or raise the input size")


# ----------------------------------------------------------------------------------------------
# U-Net building blocks
# ----------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=True),
        ))


class DoubleConv(nn.Sequential):
    """(Conv3x3 -> BN -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = mid_channels or out_channels
        super().__init__(ConvBNReLU(in_channels, mid_channels), ConvBNReLU(mid_channels, out_channels))


class Down(nn.Module):
    """MaxPool2d(2) then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.convs = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.pool(x))


class Up(nn.Module):
    """Upsample the deeper feature 2x, optionally gate the skip with it, concatenate, DoubleConv.

    `in_channels` is the width after concatenation; the upsampled feature and the skip each carry half.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool):
        super().__init__()
        if bilinear:
            self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.convs = DoubleConv(in_channels, out_channels, mid_channels=in_channels // 2)
        else:
            self.upsample = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.convs = DoubleConv(in_channels, out_channels)

    def forward(self, deeper: torch.Tensor, skip: torch.Tensor, gate: nn.Module | None = None) -> torch.Tensor:
        g = self.upsample(deeper)
        if gate is not None:
            skip = gate(skip, g)
        return self.convs(torch.cat([skip, g], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ----------------------------------------------------------------------------------------------
# Attention and context blocks
# ----------------------------------------------------------------------------------------------
class ScAG(nn.Module):
    """Spatial-channel attention gate (Khanh et al., Appl. Sci. 2020).

    Gates skip feature `x` (C_x channels) with decoder feature `g` (C_g channels, same H x W):
      spatial: S_t = Conv7x7([mean_c(t); max_c(t); Conv1x1(t)]),  a_s = sigmoid(S_x + S_g)
      channel: c_t = ReLU(W1_t GAP(t)) + ReLU(W1_t GMP(t)),     a_c = sigmoid(W2 (c_x + c_g))
      output:  x * a_s * a_c
    W1_t is shared between the average- and max-pooled vectors but separate for x and g, so C_g may
    differ from C_x; both map to the same hidden width max(C_x // reduction, min_hidden), and W2 maps
    back to C_x. The floor keeps narrow skips from getting a 1-2 unit bottleneck whose ReLUs can all
    start dead, which would leave W1_x without gradient for good.
    """

    def __init__(self, skip_channels: int, gate_channels: int, reduction: int = 8, min_hidden: int = 8):
        super().__init__()
        hidden = max(skip_channels // reduction, min_hidden)
        self.spatial_proj_x = nn.Conv2d(skip_channels, 1, kernel_size=1)
        self.spatial_proj_g = nn.Conv2d(gate_channels, 1, kernel_size=1)
        self.spatial_conv_x = nn.Conv2d(3, 1, kernel_size=7, padding=3)
        self.spatial_conv_g = nn.Conv2d(3, 1, kernel_size=7, padding=3)
        self.channel_reduce_x = nn.Linear(skip_channels, hidden)
        self.channel_reduce_g = nn.Linear(gate_channels, hidden)
        self.channel_expand = nn.Linear(hidden, skip_channels)

    @staticmethod
    def _spatial_logits(t: torch.Tensor, proj: nn.Module, conv: nn.Module) -> torch.Tensor:
        descriptor = torch.cat([t.mean(dim=1, keepdim=True), t.amax(dim=1, keepdim=True), proj(t)], dim=1)
        return conv(descriptor)

    @staticmethod
    def _channel_code(t: torch.Tensor, reduce: nn.Module) -> torch.Tensor:
        return F.relu(reduce(t.mean(dim=(2, 3)))) + F.relu(reduce(t.amax(dim=(2, 3))))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        spatial = torch.sigmoid(self._spatial_logits(x, self.spatial_proj_x, self.spatial_conv_x)
                                + self._spatial_logits(g, self.spatial_proj_g, self.spatial_conv_g))
        channel = torch.sigmoid(self.channel_expand(self._channel_code(x, self.channel_reduce_x)
                                                    + self._channel_code(g, self.channel_reduce_g)))
        return x * spatial * channel[:, :, None, None]


class BranchSelector(nn.Module):
    """Selective-Kernel attention: GAP -> FC reduce -> ReLU -> FC to K*C -> softmax over the K branches,
    per channel. Returns weights of shape (B, K, C) that sum to 1 over K."""

    def __init__(self, channels: int, branches: int, reduction: int = 16, min_hidden: int = 32):
        super().__init__()
        self.branches = branches
        hidden = max(channels // reduction, min_hidden)  # SKNet's d = max(C / r, L)
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, branches * channels)

    def forward(self, summed: torch.Tensor) -> torch.Tensor:
        logits = self.expand(F.relu(self.reduce(summed.mean(dim=(2, 3)))))
        return logits.unflatten(1, (self.branches, -1)).softmax(dim=1)


class NAC(nn.Module):
    """Neighbour-aware context block. The literature has no standard definition; this is ToothSeg's:

        NAC(x) = x + BN(Conv1x1(sum_k a_k * ReLU(BN(Conv3x3_dilation_k(x)))))

    with `a` from `BranchSelector` on the summed branches. The final BN's gamma starts at zero, so
    the block starts as the identity (the zero-gamma residual trick) and learns how much context to add.
    """

    def __init__(self, channels: int, dilations: tuple[int, ...] = (1, 2, 3, 5), reduction: int = 16):
        super().__init__()
        self.branches = nn.ModuleList(ConvBNReLU(channels, channels, dilation=d) for d in dilations)
        self.select = BranchSelector(channels, len(dilations), reduction)
        self.project = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.project_bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.project_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [branch(x) for branch in self.branches]
        weights = self.select(sum(features))
        fused = sum(w[:, :, None, None] * f for w, f in zip(weights.unbind(dim=1), features))
        return x + self.project_bn(self.project(fused))


# ----------------------------------------------------------------------------------------------
# Encoder, decoder and the models
# ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, in_channels: int, base: int, bilinear: bool):
        super().__init__()
        factor = 2 if bilinear else 1
        self.stem = DoubleConv(in_channels, base)
        self.down1 = Down(base, base * 2)
        self.down2 = Down(base * 2, base * 4)
        self.down3 = Down(base * 4, base * 8)
        self.down4 = Down(base * 8, base * 16 // factor)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features from shallow to deep: the four skips, then the deepest map."""
        features = [self.stem(x)]
        for down in (self.down1, self.down2, self.down3, self.down4):
            features.append(down(features[-1]))
        return features


class Decoder(nn.Module):
    """Four Up stages, deepest first; with `gate_reduction` set, a ScAG gates each skip."""

    def __init__(self, base: int, bilinear: bool, gate_reduction: int | None = None):
        super().__init__()
        factor = 2 if bilinear else 1
        # Each stage's output width, coarse to fine (what forward's stages have, and deep supervision's heads take).
        self.stage_widths = (base * 8 // factor, base * 4 // factor, base * 2 // factor, base)
        self.up1, self.up2, self.up3, self.up4 = (Up(base * m, width, bilinear)
                                                  for m, width in zip((16, 8, 4, 2), self.stage_widths))
        # Each stage's upsampled feature has the same width as its skip (base * 8, 4, 2, 1).
        skip_widths = (base * 8, base * 4, base * 2, base)
        gates = [ScAG(w, w, gate_reduction) if gate_reduction else None for w in skip_widths]
        self.gate1, self.gate2, self.gate3, self.gate4 = gates

    def forward(self, deepest: torch.Tensor, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each stage's output, coarse to fine: 1/8, 1/4, 1/2 and full size."""
        stages = [self.up1(deepest, skips[3], self.gate1)]
        stages.append(self.up2(stages[-1], skips[2], self.gate2))
        stages.append(self.up3(stages[-1], skips[1], self.gate3))
        stages.append(self.up4(stages[-1], skips[0], self.gate4))
        return stages


def check_trainable_size(model: nn.Module, size: tuple[int, int], batch_size: int, size_flags: str) -> None:
    """BatchNorm cannot train on one value per channel: at a batch of one, the deepest feature map (the input
    over `model.size_multiple`, rounded up) must hold more than one pixel. Found at the start, where it was a
    traceback at the first step."""
    multiple = model.size_multiple
    if batch_size == 1 and all(side <= multiple for side in size):
        raise ToothSegError(f"{size_flags} at --batch-size 1: {model.name}'s deepest layer would see one pixel, and "
                            f"BatchNorm cannot train on one value; make a side larger than {multiple}, or use "
                            f"--batch-size 2")


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Replicate-pad the bottom and right edges so height and width are multiples of `multiple`."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x


def split_outputs(outputs: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A model's output as (logits, auxiliary logits); the second is empty unless a deeply supervised U-Net trains."""
    return (outputs, []) if isinstance(outputs, torch.Tensor) else outputs


def check_channels(**values: int) -> None:
    """One-line errors for channel counts that are not positive integers."""
    for arg, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ToothSegError(f"model {arg} must be a positive integer, got {value!r}")


class UNetBase(nn.Module):
    """Shared body; subclasses set `name`, `config` and which gate/bottleneck they use."""

    name: str
    config: dict
    size_multiple = SIZE_MULTIPLE

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, bilinear: bool,
                 gate_reduction: int | None = None, bottleneck: nn.Module | None = None,
                 deep_supervision: bool = False):
        super().__init__()
        check_channels(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels)
        self.encoder = Encoder(in_channels, base_channels, bilinear)
        self.bottleneck = bottleneck if bottleneck is not None else nn.Identity()
        self.decoder = Decoder(base_channels, bilinear, gate_reduction)
        self.head = OutConv(base_channels, out_channels)
        self.deep_supervision = bool(deep_supervision)
        if self.deep_supervision:  # 1x1 heads on the 1/8, 1/4 and 1/2 stages
            self.aux_heads = nn.ModuleList(OutConv(width, out_channels) for width in self.decoder.stage_widths[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits; in training with deep supervision, (logits, the coarser stages' logits upsampled to
        the input's size, coarse to fine). Inference never sees the auxiliary heads."""
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.size_multiple)
        features = self.encoder(padded)
        stages = self.decoder(self.bottleneck(features[-1]), features[:-1])
        logits = self.head(stages[-1])[..., :height, :width]
        if not (self.training and self.deep_supervision):
            return logits
        aux = [F.interpolate(head(stage), size=padded.shape[-2:], mode="bilinear", align_corners=False)
               [..., :height, :width] for head, stage in zip(self.aux_heads, stages)]
        return logits, aux


class UNet2D(UNetBase):
    """Plain U-Net: DoubleConv stem, 4 Down, 4 Up with concatenated skips, 1x1 head."""

    name = "unet"

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32,
                 bilinear: bool = True, deep_supervision: bool = False):
        super().__init__(in_channels, out_channels, base_channels, bilinear, deep_supervision=deep_supervision)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           bilinear=bilinear, deep_supervision=self.deep_supervision)


class UNet2D_scAG(UNetBase):
    """U-Net with a spatial-channel attention gate (ScAG) on every skip connection."""

    name = "scag"

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32,
                 bilinear: bool = True, gate_reduction: int = 8, deep_supervision: bool = False):
        super().__init__(in_channels, out_channels, base_channels, bilinear, gate_reduction=gate_reduction,
                         deep_supervision=deep_supervision)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           bilinear=bilinear, gate_reduction=gate_reduction, deep_supervision=self.deep_supervision)


class UNet2D_NAC(UNetBase):
    """U-Net with a NAC block at the bottleneck and ScAG on every skip connection."""

    name = "nac"

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32,
                 bilinear: bool = True, gate_reduction: int = 8, nac_dilations: tuple[int, ...] = (1, 2, 3, 5),
                 nac_reduction: int = 16, deep_supervision: bool = False):
        deepest_channels = base_channels * 16 // (2 if bilinear else 1)
        super().__init__(in_channels, out_channels, base_channels, bilinear, gate_reduction=gate_reduction,
                         bottleneck=NAC(deepest_channels, tuple(nac_dilations), nac_reduction),
                         deep_supervision=deep_supervision)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           bilinear=bilinear, gate_reduction=gate_reduction, nac_dilations=list(nac_dilations),
                           nac_reduction=nac_reduction, deep_supervision=self.deep_supervision)


# ----------------------------------------------------------------------------------------------
# segmentation_models_pytorch architectures under the same parameter names
# ----------------------------------------------------------------------------------------------
class SMPModel(nn.Module):
    """An smp architecture (`smp_class`) as encoder / bottleneck (identity) / decoder / head.

    smp is imported here, not at the top: it pulls in timm and huggingface_hub (3 s), which the
    U-Nets and the light stages need not pay for.
    """

    name: str
    smp_class: str
    config: dict

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32,
                 bilinear: bool = True, encoder_name: str = "resnet18"):
        super().__init__()
        check_channels(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels)
        import segmentation_models_pytorch as smp

        if not isinstance(encoder_name, str) or not (encoder_name in smp.encoders.get_encoder_names()
                                                     or encoder_name.startswith("tu-")):
            raise ToothSegError(f"model {self.name!r}: unknown encoder_name {encoder_name!r}; e.g. resnet18, resnet34, "
                                f"resnet50, efficientnet-b0, mobilenet_v2, or tu-<timm model> "
                                f"(segmentation_models_pytorch.encoders.get_encoder_names() lists them all)")
        try:
            net = getattr(smp, self.smp_class)(
                encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels, classes=out_channels,
                decoder_interpolation="bilinear" if bilinear else "nearest", **self.decoder_args(base_channels))
        except (ValueError, KeyError, RuntimeError) as exc:  # e.g. an encoder this decoder does not support
            message = str(exc.args[0] if exc.args else exc).splitlines()[0]
            raise ToothSegError(f"model {self.name!r} with encoder_name {encoder_name!r}: {message}") from None
        # smp re-creates a 1- or 2-channel first conv with the legacy torch.Tensor(), which ignores a default
        # device (`with torch.device("meta"):`, as FLOP counting builds models); bring it to the others.
        default_device = torch.empty(0).device
        if any(p.device != default_device for p in net.parameters()):
            net.to(default_device)
        self.encoder = net.encoder
        self.bottleneck = nn.Identity()
        self.decoder = net.decoder
        self.head = net.segmentation_head
        self.size_multiple = int(self.encoder.output_stride)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           bilinear=bool(bilinear), encoder_name=encoder_name)

    @staticmethod
    def decoder_args(base: int) -> dict:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        features = self.encoder(pad_to_multiple(x, self.size_multiple))
        features = [*features[:-1], self.bottleneck(features[-1])]
        return self.head(self.decoder(features))[..., :height, :width]


def _unet_like_widths(base: int) -> tuple[int, ...]:
    return (base * 8, base * 4, base * 2, base, max(base // 2, 1))


class SMPUnetPlusPlus(SMPModel):
    """U-Net++ (Zhou et al. 2018): nested, densely connected skip pathways between encoder and decoder."""

    name, smp_class = "unetpp", "UnetPlusPlus"

    @staticmethod
    def decoder_args(base: int) -> dict:
        return {"decoder_channels": _unet_like_widths(base)}


class SMPFPN(SMPModel):
    """Feature Pyramid Network (Lin et al. 2017) decoder; predicts at 1/4 size, then upsamples bilinearly."""

    name, smp_class = "fpn", "FPN"

    @staticmethod
    def decoder_args(base: int) -> dict:
        return {"decoder_pyramid_channels": base * 8, "decoder_segmentation_channels": -(-base * 4 // 32) * 32}


class SMPMAnet(SMPModel):
    """MA-Net (Fan et al. 2020): position-wise attention at the bottleneck, multi-scale fusion attention on the skips."""

    name, smp_class = "manet", "MAnet"

    @staticmethod
    def decoder_args(base: int) -> dict:
        return {"decoder_channels": _unet_like_widths(base), "decoder_pab_channels": base * 2}


MODELS: dict[str, type[nn.Module]] = {cls.name: cls for cls in (UNet2D, UNet2D_scAG, UNet2D_NAC,
                                                                 SMPUnetPlusPlus, SMPFPN, SMPMAnet)}


def accepted_args(name: str) -> list[str]:
    """The keyword arguments a registered model takes (none for an unknown name, which build_model names)."""
    return list(inspect.signature(MODELS[name]).parameters) if name in MODELS else []


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by its `--model-type` name, with one-line errors for bad names or args."""
    if name not in MODELS:
        raise ToothSegError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    accepted = accepted_args(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ToothSegError(f"model {name!r} does not take {', '.join(unknown)}; it accepts {', '.join(accepted)}")
    return MODELS[name](**kwargs)
