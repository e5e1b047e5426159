"""SyncNet (Chung & Zisserman, "Out of time: automated lip sync in the wild", ACCV 2016 workshops), v2.

Our implementation of the two-stream network that the public ``syncnet_v2.model`` weights were trained with
(the ``S`` module of joonson/syncnet_python). Submodule names and ``nn.Sequential`` indices are those of the
original, so its state dict loads into :class:`SyncNet` unchanged through :func:`load_syncnet`:

* ``netcnnaud`` + ``netfcaud``: audio stream. Input: MFCCs [B, 1, 13, 20] -- 13 cepstra
  (python_speech_features defaults, c0 replaced by the log frame energy) x 20 steps at 100 Hz = 0.2 s = 5
  video frames at 25 fps. Six 2-D conv + batch-norm + ReLU stages with two max-pools reduce it to
  [B, 512, 1, 1]; two linear layers map that to a 1024-d embedding.
* ``netcnnlip`` + ``netfclip``: visual stream. Input: [B, 3, 5, 224, 224] -- five consecutive 224 x 224
  face crops, BGR channel order, raw pixel values in [0, 255] (no normalisation; see
  ``tasks.evaluation.lipsync``). A (5, 7, 7) 3-D conv consumes the whole time axis, then (1, k, k) convs and
  pools reduce space to [B, 512, 1, 1, 1]; two linear layers map that to a 1024-d embedding.

Audio and lip embeddings of the same 0.2 s are close in Euclidean distance when speech and mouth agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

EMBED_DIM = 1024
MFCC_SHAPE = (1, 13, 20)  # per sample: channel, cepstra, 100 Hz steps
LIP_SHAPE = (3, 5, 224, 224)  # per sample: BGR, frames, height, width
PREFIX = "__S__."  # syncnet_python's SyncNetInstance holds the network as the attribute ``__S__``


def _fc_head(out_dim: int) -> nn.Sequential:
    """512 -> 512 (BN, ReLU) -> ``out_dim``; indices 0..3 as in the original."""
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, out_dim))


class SyncNet(nn.Module):
    """The syncnet_v2 audio-visual embedding network.

    ``forward_aud`` maps MFCC windows [B, 1, 13, 20] to [B, 1024]; ``forward_lip`` maps 5-frame face windows
    [B, 3, 5, 224, 224] (BGR, 0..255 floats) to [B, 1024]. Call ``.eval()`` before use: the batch-norm layers
    must use their running statistics (``load_syncnet`` returns the network in eval mode).
    """

    def __init__(self, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        relu = nn.ReLU
        # Registration order (aud, fc aud, fc lip, lip) follows the original so state-dict key order matches.
        self.netcnnaud = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1),  # 0
            nn.BatchNorm2d(64), relu(inplace=True),
            nn.MaxPool2d(kernel_size=1, stride=1),  # 3 (a no-op kept for the indices)
            nn.Conv2d(64, 192, kernel_size=3, stride=1, padding=1),  # 4
            nn.BatchNorm2d(192), relu(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),  # 7: [13, 20] -> [11, 9]
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 8
            nn.BatchNorm2d(384), relu(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 11
            nn.BatchNorm2d(256), relu(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 14
            nn.BatchNorm2d(256), relu(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 17: [11, 9] -> [5, 4]
            nn.Conv2d(256, 512, kernel_size=(5, 4), padding=0),  # 18: -> [1, 1]
            nn.BatchNorm2d(512), relu(),
        )
        self.netfcaud = _fc_head(embed_dim)
        self.netfclip = _fc_head(embed_dim)
        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, 96, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=0),  # 0: 5x224 -> 1x109
            nn.BatchNorm3d(96), relu(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # 3: -> 54
            nn.Conv3d(96, 256, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),  # 4: -> 26
            nn.BatchNorm3d(256), relu(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # 7: -> 13
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),  # 8
            nn.BatchNorm3d(256), relu(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),  # 11
            nn.BatchNorm3d(256), relu(inplace=True),
            nn.Conv3d(256, 256, kernel_size=(1, 3, 3), padding=(0, 1, 1)),  # 14
            nn.BatchNorm3d(256), relu(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),  # 17: -> 6
            nn.Conv3d(256, 512, kernel_size=(1, 6, 6), padding=0),  # 18: -> 1
            nn.BatchNorm3d(512), relu(inplace=True),
        )

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        """Audio embedding: MFCC windows [B, 1, 13, 20] -> [B, 1024]."""
        mid = self.netcnnaud(mfcc)
        return self.netfcaud(mid.flatten(1))

    def forward_lip(self, video: torch.Tensor) -> torch.Tensor:
        """Visual embedding: face windows [B, 3, 5, 224, 224] (BGR, 0..255) -> [B, 1024]."""
        mid = self.netcnnlip(video)
        return self.netfclip(mid.flatten(1))

    def forward(self, video: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings: ``(forward_lip(video), forward_aud(mfcc))``."""
        return self.forward_lip(video), self.forward_aud(mfcc)


def load_syncnet(path: str | Path) -> SyncNet:
    """A :class:`SyncNet` in eval mode on the CPU with the weights of the state-dict file at ``path``.

    The file is read with ``torch.load(map_location="cpu", weights_only=True)`` and must hold a mapping of
    parameter name -> tensor (syncnet_python's ``syncnet_v2.model`` is one: its ``loadParameters`` iterates
    ``.items()`` of what ``torch.load`` returns). A leading ``__S__.`` on the keys (a state dict of
    syncnet_python's ``SyncNetInstance`` wrapper) is stripped. Loading is strict, with one allowance: the
    batch-norm ``num_batches_tracked`` counters, which checkpoints saved before PyTorch 0.4 do not have and
    which eval-mode inference never reads, are kept at their initial value when absent.

    Raises ``FileNotFoundError`` when there is no file at ``path`` and ``RuntimeError`` naming ``path`` when
    it cannot be read or its keys or shapes do not match the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SyncNet weights not found at {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise RuntimeError(f"cannot read SyncNet weights at {path}: {exc}") from exc
    if not isinstance(loaded, Mapping):
        raise RuntimeError(f"SyncNet weights at {path} are a {type(loaded).__name__}, not a state dict")
    state = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in loaded.items()}
    net = SyncNet()
    own = net.state_dict()
    for key, value in own.items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = value
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(
            f"SyncNet weights at {path} do not match the syncnet_v2 architecture: {exc}") from exc
    return net.eval()
