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
        return F.relu(self.bn_last(self.last(self._path(x, 3) + self._path(x, 5))))


class VisualEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = _SplitBlock(3, 1, 32, down=True)
        self.block2 = _SplitBlock(3, 32, 64)
        self.block3 = _SplitBlock(3, 64, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, T, H, W] normalised
        pool = dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        x = F.max_pool3d(self.block1(x), **pool)
        x = F.max_pool3d(self.block2(x), **pool)
        x = self.block3(x)  # [B, 128, T, h, w]
        return x.amax(dim=(3, 4)).transpose(1, 2)  # [B, T, 128]


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

    def forward(self, mfcc: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """mfcc [B, 4T, 13] (100 Hz), faces [B, T, 112, 112] grey uint8-range -> speaking logit [B, T]."""
        v = self.visual(((faces.float() / 255 - GREY_MEAN) / GREY_STD).unsqueeze(1))
        a = self.audio(mfcc.float().unsqueeze(1).transpose(2, 3))
        t = min(a.shape[1], v.shape[1])
        x = self.gru(a[:, :t] + v[:, :t])
        return self.head_av(x)[..., 1]


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
