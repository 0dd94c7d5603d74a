"""Random-weight stand-ins for face-alignment's S3FD and 2D FAN, in the official file formats.

S3FD keeps the real architecture (fixed channels) but its classification heads are pinned so that it
finds no face anywhere: a random detector would otherwise report thousands of boxes. Tests that need a
face use the Haar cascade (also with ``full_size=True``). FAN has one hourglass module instead of four,
or the real 2DFAN4's four with ``full_size=True``.
"""

from __future__ import annotations

import logging

import torch
from face_alignment.detection.sfd.net_s3fd import s3fd
from face_alignment.models import FAN

from musetalk.layout import ModelLayout

logger = logging.getLogger(__name__)

# S3FD's classification convs: background logits (all channels but the last) and the face logit (last).
S3FD_CONF_HEADS = (
    "conv3_3_norm_mbox_conf",
    "conv4_3_norm_mbox_conf",
    "conv5_3_norm_mbox_conf",
    "fc7_mbox_conf",
    "conv6_2_mbox_conf",
    "conv7_2_mbox_conf",
)
BACKGROUND_BIAS = 10.0  # face probability ~ exp(-20): far below S3FD's 0.05 candidate threshold
HEAD_WEIGHT_SCALE = 1e-3  # keeps the input's influence on the logits negligible next to the biases
FULL_FAN_MODULES = 4  # 2DFAN4


def tiny_s3fd(seed: int) -> torch.nn.Module:
    """face-alignment's s3fd with seeded random weights whose face score is ~0 everywhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = s3fd()
    with torch.no_grad():
        for name in S3FD_CONF_HEADS:
            head = getattr(net, name)
            head.weight.mul_(HEAD_WEIGHT_SCALE)
            head.bias.fill_(BACKGROUND_BIAS)
            head.bias[-1] = -BACKGROUND_BIAS
    return net.eval()


def tiny_fan(seed: int, *, full_size: bool = False) -> torch.nn.Module:
    """face-alignment's FAN with one hourglass module (four with ``full_size``) and seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FAN(FULL_FAN_MODULES if full_size else 1)
    return net.eval()


def write_tiny_face_models(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write ``layout.s3fd`` and ``layout.fan`` as plain state dicts (the official formats)."""
    for path, net in ((layout.s3fd, tiny_s3fd(seed)), (layout.fan, tiny_fan(seed + 1, full_size=full_size))):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
        logger.info("wrote %s", path)
