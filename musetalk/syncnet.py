"""SyncNet (Chung and Zisserman, 2016), the lip-sync scorer: audio and lip embeddings of 5-frame windows.

The layer layout follows the reference implementation (``joonson/syncnet_python``, ``SyncNetModel.S``)
so its published ``syncnet_v2.model`` (a plain state dict: ``netcnnaud.*``, ``netfcaud.*``,
``netcnnlip.*``, ``netfclip.*``; 13.6 M parameters, ~52 MB) loads strictly by name. The code here is
ours; only the layout is the reference's.

Inputs (what the reference feeds it, see :mod:`musetalk.syncscore` for how they are built):
- lip windows ``(N, 3, 5, 224, 224)`` float32, BGR, raw 0..255 (no normalisation);
- audio windows ``(N, 1, 13, 20)`` float32: 13 MFCC x 20 steps at 100 Hz (0.2 s = 5 frames at 25 fps).
Both give ``(N, 1024)`` embeddings, not normalised; their L2 distance measures sync.

Batches are padded to a fixed size (:data:`BATCH`): which windows share a batch never changes a result,
so scores do not depend on how a job was sharded (the facts in DESIGN.md). The scorer is loaded only
when ``qa.sync`` is on; rendering never needs it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from musetalk.layout import ModelLayout

EMBEDDING = 1024
BATCH = 8  # windows per model call, the last batch padded with zeros
LIP_SHAPE = (3, 5, 224, 224)
AUDIO_SHAPE = (1, 13, 20)


def _conv2(cin: int, cout: int, **kw) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, **kw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _conv3(cin: int, cout: int, **kw) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, **kw), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


def _head(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, out))


class SyncNet(nn.Module):
    """The two-stream network; module names and indices match ``syncnet_v2.model``'s keys.

    ``div`` divides every width (1: the real network, 13.6 M parameters). The test stand-in
    (:mod:`musetalk.testing.tiny_syncnet`) is ``div=16``: the same layers and input sizes at ~1/250 of the
    compute; :func:`load_syncnet` reads ``div`` from the file's shapes."""

    def __init__(self, div: int = 1) -> None:
        super().__init__()
        a, b, c, d, e, f = (w // div for w in (64, 192, 384, 256, 96, 512))
        self.div = div
        self.netcnnaud = nn.Sequential(
            *_conv2(1, a, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=1, stride=1),
            *_conv2(a, b, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=(1, 2)),
            *_conv2(b, c, kernel_size=3, padding=1),
            *_conv2(c, d, kernel_size=3, padding=1),
            *_conv2(d, d, kernel_size=3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv2(d, f, kernel_size=(5, 4)),
        )
        self.netfcaud = _head(f, EMBEDDING // div)
        self.netcnnlip = nn.Sequential(
            *_conv3(3, e, kernel_size=(5, 7, 7), stride=(1, 2, 2)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3(e, d, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *_conv3(d, d, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            *_conv3(d, d, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            *_conv3(d, d, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),
            *_conv3(d, f, kernel_size=(1, 6, 6)),
        )
        self.netfclip = _head(f, EMBEDDING // div)

    @property
    def embedding(self) -> int:
        return self.netfclip[3].out_features

    def forward_audio(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 13, 20) MFCC windows -> (N, 1024)."""
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 5, 224, 224) BGR 0..255 windows -> (N, 1024)."""
        return self.netfclip(self.netcnnlip(x).flatten(1))


class SyncScorer:
    """Embeddings from an already-loaded :class:`SyncNet`, in padded batches of :data:`BATCH`."""

    def __init__(self, net: SyncNet, device: torch.device | str = "cpu") -> None:
        self.net = net.eval()
        self.device = torch.device(device)

    @property
    def embedding(self) -> int:
        return self.net.embedding

    @torch.inference_mode()
    def _run(self, forward, items: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros((len(items), self.embedding), np.float32)
        for i in range(0, len(items), BATCH):
            chunk = items[i : i + BATCH]
            batch = np.zeros((BATCH, *shape), np.float32)
            batch[: len(chunk)] = chunk
            y = forward(torch.from_numpy(batch).to(self.device))
            out[i : i + len(chunk)] = y[: len(chunk)].float().cpu().numpy()
        return out

    def lips(self, windows: np.ndarray) -> np.ndarray:
        """(N, 5, 224, 224, 3) uint8 BGR crops, 5 consecutive 25 fps frames each -> (N, E) float32
        (E = 1024 for the real network)."""
        if len(windows) == 0:
            return np.zeros((0, self.embedding), np.float32)
        x = np.ascontiguousarray(np.asarray(windows, np.float32).transpose(0, 4, 1, 2, 3))
        return self._run(self.net.forward_lip, x, LIP_SHAPE)

    def audio(self, windows: np.ndarray) -> np.ndarray:
        """(N, 13, 20) MFCC windows -> (N, 1024) float32."""
        if len(windows) == 0:
            return np.zeros((0, self.embedding), np.float32)
        return self._run(self.net.forward_audio, np.asarray(windows, np.float32)[:, None], AUDIO_SHAPE)


def load_syncnet(layout: ModelLayout, device: torch.device | str = "cpu") -> SyncScorer:
    """``syncnet_v2.model`` from ``layout`` as a scorer on ``device``; a missing or malformed file raises
    WeightsError naming the file, its place and the fetch command. Every key and shape must match the
    reference layout (strict), at the width the file has (see :class:`SyncNet`)."""
    path = layout.syncnet
    state = layout.load_torch_state(path, "SyncNet weights (syncnet_v2.model)")
    width = state.get("netfcaud.0.weight")
    div = 512 // width.shape[0] if width is not None and width.ndim == 2 and width.shape[0] else 1
    net = SyncNet(div if div in (1, 2, 4, 8, 16, 32) else 1)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise layout.malformed(path, "SyncNet weights (syncnet_v2.model)", " ".join(first[:3])) from err
    return SyncScorer(net.to(device), device)
