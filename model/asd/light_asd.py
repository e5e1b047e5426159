"""Light-ASD (Liao et al., CVPR 2023): a lightweight audio-visual active speaker detector.

Our implementation of the published architecture, with parameter names chosen so that the authors'
released checkpoints (``finetuning_TalkSet.model``, ``pretrain_AVA_CVPR.model``) load through
:func:`load_light_asd`:

* visual encoder: three blocks of split 3D convolutions -- a spatial (1,k,k) then a temporal (k,1,1) conv
  on two paths (k = 3 and 5) summed, then a 1x1x1 conv -- with spatial max pooling between blocks and a
  per-frame spatial max at the end: [B, T, 112, 112] grey face crops -> [B, T, 128];
* audio encoder: the same idea in 2D over MFCCs (a (k,1) conv along the cepstra, a (1,k) conv along time),
  time pooled 4x so 100 Hz MFCCs meet 25 fps video: [B, 4T, 13] -> [B, T, 128];
* back end: audio + visual embeddings summed, a forward GRU and a backward GRU (each followed by GELU),
  a linear layer to 2 classes. The per-frame score is the logit of the "speaking" class.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

GREY_MEAN, GREY_STD = 0.4161, 0.1688


class _SplitBlock(nn.Module):
    """Two (spatial-then-temporal) conv paths with kernels 3 and 5, summed, then a pointwise conv.
    ``dims=3`` for video [B, C, T, H, W] (spatial convs may stride 2), ``dims=2`` for audio [B, C, F, T]."""

    def __init__(self, dims: int, cin: int, cout: int, down: bool = False) -> None:
        super().__init__()
        conv, bn = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        self.dims = dims
        for k in (3, 5):
            p = k // 2
            if dims == 3:  # s = spatial, t = temporal
                first = conv(cin, cout, (1, k, k), stride=(1, 2, 2) if down else 1, padding=(0, p, p), bias=False)
                second = conv(cout, cout, (k, 1, 1), padding=(p, 0, 0), bias=False)
                names = (f"s_{k}", f"t_{k}")
            else:  # m = along the MFCC axis, t = along time
                first = conv(cin, cout, (k, 1), padding=(p, 0), bias=False)
                second = conv(cout, cout, (1, k), padding=(0, p), bias=False)
                names = (f"m_{k}", f"t_{k}")
            setattr(self, names[0], first)
            setattr(self, f"bn_{names[0]}", bn(cout, momentum=0.01, eps=0.001))
            setattr(self, names[1], second)
            setattr(self, f"bn_{names[1]}", bn(cout, momentum=0.01, eps=0.001))
        self.last = conv(cout, cout, 1, bias=False)
        self.bn_last = bn(cout, momentum=0.01, eps=0.001)

    def _path(self, x: torch.Tensor, k: int) -> torch.Tensor:
        a = "s" if self.dims == 3 else "m"
        x = F.relu(getattr(self, f"bn_{a}_{k}")(getattr(self, f"{a}_{k}")(x)))
        return F.relu(getattr(self, f"bn_t_{k}")(getattr(self, f"t_{k}")(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            return self._forward_video(x)
        return F.relu(self.bn_last(self.last(self._path(x, 3) + self._path(x, 5))))

    def _forward_video(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.frames_forward(x.transpose(1, 2).reshape(b * t, c, h, w), b, t)
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)

    def frames_forward(self, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """The block on frames [B*T, C, H, W] -> [B*T, C', H', W'] (channels last): the same computation as
        the 3D convolutions, as 2D ones -- a (1, k, k) conv is a 2D conv of every frame, a (k, 1, 1) conv a 2D
        conv with a (k, 1) kernel over [B, C, T, H*W], a view of the same channels-last memory, so nothing is
        transposed between them; in eval mode each batch norm is folded into its conv. oneDNN runs this ~2x
        faster than the 3D form on CPU (tested equal)."""
        frames = frames.contiguous(memory_format=torch.channels_last)
        total = None
        for k in (3, 5):
            spatial, temporal = getattr(self, f"s_{k}"), getattr(self, f"t_{k}")
            y = _conv_bn(frames, spatial.weight[:, :, 0], getattr(self, f"bn_s_{k}"), stride=spatial.stride[1:],
                         padding=spatial.padding[1:])  # fmt: skip
            co, ho, wo = y.shape[1:]
            y = _as_time(y, b, t)  # [B, C, T, H*W]
            y = _conv_bn(y, temporal.weight[..., 0], getattr(self, f"bn_t_{k}"), padding=(temporal.padding[0], 0))
            if total is None:
                total = y
            else:  # in place unless autograd needs the first path's output (its ReLU's backward)
                total = total + y if torch.is_grad_enabled() else total.add_(y)
        y = _pointwise_bn(total, self.last.weight.flatten(1), self.bn_last)  # [B, T, H*W, C]
        return y.reshape(b * t, ho, wo, co).permute(0, 3, 1, 2)


def _as_time(frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H*W] over the same channels-last memory (a copy only if it is not)."""
    n, c, h, w = frames.shape
    return frames.permute(0, 2, 3, 1).reshape(b, t, h * w, c).permute(0, 3, 1, 2)


def _conv_bn(x: torch.Tensor, weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, **conv) -> torch.Tensor:
    """relu(bn(conv2d(x, weight))) with a BatchNorm3d's parameters: folded into the conv in eval mode, batch
    statistics over every dim but the channels when training (as the 3D layer)."""
    if bn.training:
        return F.relu_(F.batch_norm(F.conv2d(x, weight, **conv), bn.running_mean, bn.running_var, bn.weight,
                                    bn.bias, True, bn.momentum, bn.eps))  # fmt: skip
    scale, bias = _folded(bn)
    return F.relu_(F.conv2d(x, weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias, **conv))


def _folded(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm as y * scale + bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _pointwise_bn(x: torch.Tensor, weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """relu(bn(1x1 conv)) of channels-last x [B, C, T, N] as one matrix product over the channels (oneDNN has
    no fast 1x1 path for this layout) -> [B, T, N, C'] contiguous."""
    y = F.linear(x.permute(0, 2, 3, 1), weight)
    if bn.training:
        shape = y.shape
        y = F.batch_norm(y.reshape(-1, shape[-1]), bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                         bn.momentum, bn.eps).reshape(shape)  # fmt: skip
        return F.relu_(y)
    scale, bias = _folded(bn)
    return F.relu_(y.mul_(scale).add_(bias))


class VisualEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = _SplitBlock(3, 1, 32, down=True)
        self.block2 = _SplitBlock(3, 32, 64)
        self.block3 = _SplitBlock(3, 64, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, T, H, W] normalised
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # every frame; the blocks' temporal convs see [B, C, T, .]
        y = F.max_pool2d(self.block1.frames_forward(y, b, t), kernel_size=3, stride=2, padding=1)
        y = F.max_pool2d(self.block2.frames_forward(y, b, t), kernel_size=3, stride=2, padding=1)
        y = self.block3.frames_forward(y, b, t)  # [B*T, 128, h, w]
        return y.amax(dim=(2, 3)).reshape(b, t, -1)  # [B, T, 128]


class AudioEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = _SplitBlock(2, 1, 32)
        self.block2 = _SplitBlock(2, 32, 64)
        self.block3 = _SplitBlock(2, 64, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 13, 4T]
        pool = dict(kernel_size=(1, 3), stride=(1, 2), padding=(0, 1))
        x = F.max_pool2d(self.block1(x), **pool)
        x = F.max_pool2d(self.block2(x), **pool)
        x = self.block3(x)  # [B, 128, 13, T]
        return x.mean(dim=2).transpose(1, 2)  # [B, T, 128]


class BiGRU(nn.Module):
    """A forward GRU, then a GRU over the reversed sequence; GELU after each."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.gru_forward = nn.GRU(dim, dim, batch_first=True)
        self.gru_backward = nn.GRU(dim, dim, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.gru_forward(x)[0])
        x = self.gru_backward(x.flip(1))[0].flip(1)
        return F.gelu(x)


class LightASD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = VisualEncoder()
        self.audio = AudioEncoder()
        self.gru = BiGRU(128)
        self.head_av = nn.Linear(128, 2)
        self.head_v = nn.Linear(128, 2)  # visual-only auxiliary head (training)

    # frames of context each side that make a chunk's visual features equal the whole sequence's: each of the
    # three blocks' temporal convs (k <= 5) reaches 2 frames further
    VISUAL_REACH = 6

    def forward(self, mfcc: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """mfcc [B, 4T, 13] (100 Hz), faces [B, T, 112, 112] grey uint8-range -> speaking logit [B, T]."""
        return self.classify(self.frame_embeddings(mfcc, faces))

    def frame_embeddings(self, mfcc: torch.Tensor, faces: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """The per-frame audio + visual embedding [B, T, 128] the GRUs read. ``chunk`` > 0: the visual encoder
        runs on pieces of that many frames with ``VISUAL_REACH`` frames of context each side (the same result
        as one pass, in bounded memory)."""
        a = self.audio(mfcc.float().unsqueeze(1).transpose(2, 3))
        n = faces.shape[1]
        if chunk <= 0 or n <= chunk:
            v = self._visual(faces)
        else:
            r, parts = self.VISUAL_REACH, []
            for s in range(0, n, chunk):
                lo, hi = max(0, s - r), min(n, s + chunk + r)
                parts.append(self._visual(faces[:, lo:hi])[:, s - lo : s - lo + min(chunk, n - s)])
            v = torch.cat(parts, 1)
        t = min(a.shape[1], v.shape[1])
        return a[:, :t] + v[:, :t]

    def _visual(self, faces: torch.Tensor) -> torch.Tensor:
        return self.visual(((faces.float() / 255 - GREY_MEAN) / GREY_STD).unsqueeze(1))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, T, 128] -> speaking logit [B, T] (the bidirectional GRUs and the audio-visual head)."""
        return self.head_av(self.gru(x))[..., 1]


_RENAME = (
    ("model.visualEncoder.", "visual."),
    ("model.audioEncoder.", "audio."),
    ("model.GRU.", "gru."),
    ("lossAV.FC.", "head_av."),
    ("lossV.FC.", "head_v."),
)


def load_light_asd(path: str | Path, device: str | torch.device = "cpu") -> LightASD:
    """Load a released Light-ASD checkpoint (a plain state dict) into :class:`LightASD`, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Light-ASD weights not found: {path} (curate.asd_weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        for old, new in _RENAME:
            if key.startswith(old):
                renamed[new + key[len(old) :]] = value
                break
        else:
            raise ValueError(f"{path}: unexpected tensor {key!r}; is this a Light-ASD checkpoint?")
    model = LightASD()
    model.load_state_dict(renamed, strict=True)
    return model.to(device).eval()
