"""A random-weight SyncNet in the format of ``syncnet_v2.model`` (a plain state dict, reference key names).

The tiny set writes :class:`musetalk.syncnet.SyncNet` with ``div=16`` (every width / 16: ~60 k parameters,
a few ms per window on a CPU); ``full_size=True`` writes the real widths (13.6 M parameters, ~52 MB, ~30 ms
per window on a 2-core CPU). Both load through :func:`musetalk.syncnet.load_syncnet`. Random weights make
the scores meaningless: tests check that every field is written and that the maths holds, not the values.
"""

from __future__ import annotations

import torch

from musetalk.layout import ModelLayout
from musetalk.syncnet import SyncNet

TINY_DIV = 16


def write_tiny_syncnet(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write ``layout.syncnet`` from a seeded random network."""
    torch.manual_seed(seed)
    net = SyncNet(1 if full_size else TINY_DIV)
    layout.syncnet.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), layout.syncnet)
