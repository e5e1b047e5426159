"""TalkNet-ASD (Tao et al., ACM MM 2021): an audio-visual active speaker detector with long-term
temporal context ("Is Someone Speaking? Exploring Long-term Temporal Features for Audio-visual Active
Speaker Detection").

Our implementation of the published architecture. Its parameters map one-to-one, through
:data:`_KEY_MAP`, onto the keys of the authors' released checkpoints (``pretrain_TalkSet.model``,
``pretrain_AVA.model``: a plain ``state_dict`` of their training wrapper, keys ``model.*`` for the network
and ``lossAV.FC.*`` / ``lossA.FC.*`` / ``lossV.FC.*`` for the three classifier heads), so that
:func:`load_talknet` loads them strictly. Inputs are prepared exactly as for Light-ASD
(:mod:`model.asd.light_asd`): 13 MFCCs at 100 Hz and 112x112 grey face crops at 25 fps.

Visual temporal encoder, [B, T, 112, 112] -> [B, T, 128]:

* front end (lip-reading style, after deep_avsr): a 3D conv stem -- Conv3d 1->64, kernel (5, 7, 7),
  stride (1, 2, 2), BN, ReLU, max pool (1, 3, 3)/(1, 2, 2) -- then, frame by frame, an 18-layer 2D ResNet
  trunk (four stages 64/128/256/512, strides 1/2/2/2, each two basic blocks of the "pre-sum" form
  conv-BN-ReLU-conv, + shortcut, BN-ReLU) and a 4x4 average pool: a 512-d vector per frame. Every stage
  owns a 1x1 shortcut conv, even the first, where it is never used (stride 1): it is in the checkpoint;
* V-TCN: five residual depthwise-separable 1D conv blocks over time (ReLU, BN, depthwise conv k=3, PReLU,
  global layer norm, pointwise conv), then Conv1d 512->256 (k=5), BN, ReLU, Conv1d 256->128.

Audio temporal encoder, [B, 4T, 13] -> [B, T, 128]: a ResNet-34-shaped network with squeeze-and-excitation
blocks over the MFCC "image" [B, 1, 13, 4T] -- a 7x7 conv (stride 2 along the cepstra), then stages of
[3, 4, 6, 3] SE basic blocks with [16, 32, 64, 128] filters, strides 1, 2, 2, 1 -- so time is halved twice
(100 Hz -> 25 Hz), and a mean over the cepstral axis.

Back end: cross-attention both ways, then self-attention, all "post-norm" transformer layers (multi-head
attention with 8 heads, residual, LayerNorm, ReLU feed-forward of width 4d, residual, LayerNorm):

* audio' = layer_a2v(keys/values = audio, queries = visual, residual on audio), visual' likewise the
  other way round (the authors' ``crossA2V`` / ``crossV2A``, d = 128);
* self-attention (d = 256) over [audio', visual'] concatenated;
* ``lossAV`` FC 256->2 gives the audio-visual classes; ``lossA`` / ``lossV`` FC 128->2 are the
  audio-only / visual-only auxiliary heads used in training (kept so the checkpoint loads strictly).

The per-frame score is the logit of the "speaking" class (index 1) of the audio-visual head, what the
authors' demo thresholds at 0.

One deliberate difference: the authors' visual front end runs the temporal 3D conv over all B*T frames of
a batch as one sequence, so with B > 1 two frames at each clip boundary see the neighbouring clip. We
convolve each clip on its own; for one clip (B = 1, how the demo and :func:`tasks.curation.asd.asd_scores`
run it) both are the same computation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.asd.light_asd import GREY_MEAN, GREY_STD

FACE_SIZE = 112


# ---------------------------------------------------------------------------------------------- visual


def _bn2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=0.01, eps=0.001)


class TrunkStage(nn.Module):
    """Two basic residual blocks in the deep_avsr form: the shortcut is added before the block's BN-ReLU.

    block a: conv1a-bn1a-ReLU-conv2a, + (input, or the strided 1x1 ``downsample`` of it), outbna-ReLU;
    block b: conv1b-bn1b-ReLU-conv2b, + block a's pre-norm sum, outbnb-ReLU.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1a = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1a = _bn2d(cout)
        self.conv2a = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.downsample = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)  # unused when stride == 1
        self.outbna = _bn2d(cout)
        self.conv1b = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1b = _bn2d(cout)
        self.conv2b = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.outbnb = _bn2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.stride == 1 else self.downsample(x)
        summed = self.conv2a(F.relu(self.bn1a(self.conv1a(x)))) + shortcut
        y = F.relu(self.outbna(summed))
        y = self.conv2b(F.relu(self.bn1b(self.conv1b(y)))) + summed
        return F.relu(self.outbnb(y))


class Trunk(nn.Module):
    """The 18-layer 2D ResNet applied to every frame: [N, 64, 28, 28] -> [N, 512]."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = TrunkStage(64, 64, 1)
        self.layer2 = TrunkStage(64, 128, 2)
        self.layer3 = TrunkStage(128, 256, 2)
        self.layer4 = TrunkStage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, 512, 4, 4]
        return F.avg_pool2d(x, kernel_size=4, stride=1).flatten(1)


class Stem3D(nn.Module):
    """Conv3d (5, 7, 7) over time and space, BN, ReLU, spatial max pool: [B, 1, T, 112, 112] -> 28x28."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 64, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False)
        self.bn = nn.BatchNorm3d(64, momentum=0.01, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return F.max_pool3d(x, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))


class VisualFrontend(nn.Module):
    """Normalised grey faces [B, 1, T, 112, 112] -> per-frame embeddings [B, T, 512]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem3D()
        self.trunk = Trunk()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t = x.shape[:3]
        x = self.stem(x)  # [B, 64, T, 28, 28]
        x = x.transpose(1, 2).flatten(0, 1)  # [B*T, 64, 28, 28]
        return self.trunk(x).view(b, t, 512)


class GlobalLayerNorm(nn.Module):
    """Layer norm over channels AND time of a [B, C, T] sequence, with a per-channel affine."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(1, 2), keepdim=True)
        return self.gamma * (x - mean) / (var + 1e-8).sqrt() + self.beta


class SeparableBlock(nn.Module):
    """x + pointwise(gLN(PReLU(depthwise(BN(ReLU(x)))))), on [B, 512, T]."""

    def __init__(self, channels: int = 512) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.depthwise = nn.Conv1d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.prelu = nn.PReLU()
        self.norm = GlobalLayerNorm(channels)
        self.pointwise = nn.Conv1d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.bn(F.relu(x)))
        return x + self.pointwise(self.norm(self.prelu(y)))


class VisualTemporal(nn.Module):
    """V-TCN (five separable blocks) then the 512 -> 256 -> 128 projection: [B, T, 512] -> [B, T, 128]."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SeparableBlock(512) for _ in range(5))
        self.conv1 = nn.Conv1d(512, 256, 5, padding=2)
        self.bn = nn.BatchNorm1d(256)
        self.conv2 = nn.Conv1d(256, 128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------------------------- audio


class SqueezeExcite(nn.Module):
    """Channel gating by a two-layer MLP (reduction 8) of the spatially averaged features."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SEBlock(nn.Module):
    """SE basic block; note the authors' order conv1 -> ReLU -> bn1 in the first half."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(F.relu(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class AudioEncoder(nn.Module):
    """MFCC image [B, 1, 13, 4T] -> [B, T, 128] (time strides 1, 1, 2, 2, 1: 100 Hz -> 25 Hz)."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), filters: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, filters[0], 7, stride=(2, 1), padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        cin = filters[0]
        for i, (n, cout, stride) in enumerate(zip(layers, filters, (1, 2, 2, 1), strict=True), start=1):
            blocks = [SEBlock(cin, cout, stride)] + [SEBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 128, 2, T]
        return x.mean(dim=2).transpose(1, 2)


# ------------------------------------------------------------------------------------------- attention


class AttentionLayer(nn.Module):
    """Post-norm transformer layer whose queries may come from another stream.

    ``forward(src, query)``: LN(src + MHA(query, src, src)), then LN(x + FFN(x)) with a ReLU FFN of width 4d.
    Self-attention is ``forward(x, x)``. Dropout 0.1 (training only), as in the original.
    """

    def __init__(self, d_model: int, nhead: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, 4 * d_model)
        self.linear2 = nn.Linear(4 * d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, query: torch.Tensor) -> torch.Tensor:  # [B, T, d] each
        attended = self.self_attn(query, src, src, need_weights=False)[0]
        x = self.norm1(src + self.dropout(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ffn))


# ------------------------------------------------------------------------------------------------ model


class TalkNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = VisualFrontend()
        self.visual_temporal = VisualTemporal()
        self.audio = AudioEncoder()
        self.cross_a2v = AttentionLayer(128, 8)
        self.cross_v2a = AttentionLayer(128, 8)
        self.self_av = AttentionLayer(256, 8)
        self.head_av = nn.Linear(256, 2)
        self.head_a = nn.Linear(128, 2)  # audio-only auxiliary head (training)
        self.head_v = nn.Linear(128, 2)  # visual-only auxiliary head (training)

    def embed(self, mfcc: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (audio [B, T, 128], visual [B, T, 128]) after cross-attention, and the fused [B, T, 256]."""
        if faces.shape[-2:] != (FACE_SIZE, FACE_SIZE):
            raise ValueError(f"TalkNet needs {FACE_SIZE}x{FACE_SIZE} face crops, got {tuple(faces.shape)}")
        v = self.visual(((faces.float() / 255 - GREY_MEAN) / GREY_STD).unsqueeze(1))
        v = self.visual_temporal(v)
        a = self.audio(mfcc.float().unsqueeze(1).transpose(2, 3))
        t = min(a.shape[1], v.shape[1])
        a, v = a[:, :t], v[:, :t]
        a, v = self.cross_a2v(a, query=v), self.cross_v2a(v, query=a)
        av = torch.cat((a, v), dim=2)
        return a, v, self.self_av(av, query=av)

    def forward(self, mfcc: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """mfcc [B, 4T, 13] (100 Hz), faces [B, T, 112, 112] grey uint8-range -> speaking logit [B, T]."""
        return self.head_av(self.embed(mfcc, faces)[2])[..., 1]


# --------------------------------------------------------------------------------------------- weights

# (our prefix, checkpoint prefix); "{n}" stands for a block index. Anything not listed keeps its name
# below the prefix (ResNet / transformer-style names: conv1, bn1, layer2.0.se.fc.0, self_attn, norm1 ...).
_KEY_MAP = (
    ("visual.stem.conv.", "model.visualFrontend.frontend3D.0."),
    ("visual.stem.bn.", "model.visualFrontend.frontend3D.1."),
    ("visual.trunk.", "model.visualFrontend.resnet."),
    ("visual_temporal.blocks.{n}.bn.", "model.visualTCN.net.{n}.net.1."),
    ("visual_temporal.blocks.{n}.depthwise.", "model.visualTCN.net.{n}.net.2."),
    ("visual_temporal.blocks.{n}.prelu.", "model.visualTCN.net.{n}.net.3."),
    ("visual_temporal.blocks.{n}.norm.", "model.visualTCN.net.{n}.net.4."),
    ("visual_temporal.blocks.{n}.pointwise.", "model.visualTCN.net.{n}.net.5."),
    ("visual_temporal.conv1.", "model.visualConv1D.net.0."),
    ("visual_temporal.bn.", "model.visualConv1D.net.1."),
    ("visual_temporal.conv2.", "model.visualConv1D.net.3."),
    ("audio.", "model.audioEncoder."),
    ("cross_a2v.", "model.crossA2V."),
    ("cross_v2a.", "model.crossV2A."),
    ("self_av.", "model.selfAV."),
    ("head_av.", "lossAV.FC."),
    ("head_a.", "lossA.FC."),
    ("head_v.", "lossV.FC."),
)


def _compile(src: str, dst: str) -> tuple[re.Pattern, str]:
    pattern = re.escape(src).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(pattern), dst.replace("{n}", r"\g<n>")


_FROM_CHECKPOINT = tuple(_compile(theirs, ours) for ours, theirs in _KEY_MAP)
_TO_CHECKPOINT = tuple(_compile(ours, theirs) for ours, theirs in _KEY_MAP)


def _rename(key: str, table: tuple[tuple[re.Pattern, str], ...]) -> str | None:
    for pattern, repl in table:
        m = pattern.match(key)
        if m:
            return m.expand(repl) + key[m.end() :]
    return None


def checkpoint_key(name: str) -> str:
    """Our parameter/buffer name -> the key it has in the authors' checkpoints."""
    key = _rename(name, _TO_CHECKPOINT)
    if key is None:
        raise KeyError(name)
    return key


def to_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under the authors' key names (what their ``talkNet.saveParameters`` writes)."""
    return {checkpoint_key(k): v for k, v in state.items()}


def load_talknet(path: str | Path, device: str | torch.device = "cpu") -> TalkNet:
    """Load a released TalkNet checkpoint (a plain state dict) into :class:`TalkNet`, strictly.

    ``module.`` segments left by ``nn.DataParallel`` are dropped first. Raises FileNotFoundError when the file
    is missing and ValueError, naming the offending key, when it is not a TalkNet checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TalkNet weights not found: {path} (curate.asd_weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}; is this a TalkNet checkpoint?")
    model = TalkNet()
    expected = model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        plain = ".".join(part for part in str(key).split(".") if part != "module")
        name = _rename(plain, _FROM_CHECKPOINT)
        if name is None or name not in expected:
            raise ValueError(f"{path}: unexpected tensor {key!r}; is this a TalkNet checkpoint?")
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: tensor {key!r} has shape {shape}, TalkNet expects "
                             f"{tuple(expected[name].shape)}; is this a TalkNet checkpoint?")
        renamed[name] = value
    # the audio-only / visual-only heads only train; a checkpoint saved without them still scores exactly
    optional = ("head_a.", "head_v.")
    for key in expected:
        if key.startswith(optional) and key not in renamed:
            renamed[key] = expected[key]
    missing = [checkpoint_key(k) for k in expected if k not in renamed]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{path}: missing tensor(s) {', '.join(map(repr, missing[:3]))}{more}; "
                         "is this a TalkNet checkpoint?")
    model.load_state_dict(renamed, strict=True)
    return model.to(device).eval()
