"""Tiny random-weight stand-ins for the face parser and GFPGAN, in the official file formats.

- ``face-parse-bisent/resnet18-5c106cde.pth``: a ResNet18 state dict with torchvision's key names
  (``fc.*`` included, no ``num_batches_tracked``, like the 2017 file).
- ``face-parse-bisent/79999_iter.pth``: a full-size BiSeNet state dict (the architecture has fixed
  channels, ~50 MB) with random weights.
- ``gfpgan/GFPGANv1.4.pth`` = ``{"params_ema": state_dict}`` of a GFPGANv1Clean with the real
  512x512 interface but ``narrow`` 1/16 and 32 style features, plus ``gfpgan/GFPGANv1.4.json``
  holding those architecture overrides (read by :func:`musetalk.enhance.load_gfpgan`); with
  ``full_size=True`` the real v1.4 architecture (:data:`musetalk.enhance.GFPGAN_V14_ARCH`) and no JSON.

Everything is deterministic from the seed and leaves the global torch RNG as it was.
"""

from __future__ import annotations

import json
import logging

import torch

from musetalk.enhance import GFPGAN_V14_ARCH, gfpgan_arch_class
from musetalk.layout import ModelLayout
from musetalk.parsing import N_CLASSES, BiSeNet

log = logging.getLogger(__name__)

TINY_GFPGAN_ARCH = {"narrow": 0.0625, "num_style_feat": 32}


def write_tiny_face_parser(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write the ResNet18 backbone file and the BiSeNet state dict below ``layout`` (always full-size)."""
    layout.face_parse.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = BiSeNet(N_CLASSES).eval()
        fc = torch.nn.Linear(512, 1000)
    backbone = {k: v for k, v in net.cp.resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    backbone.update({"fc.weight": fc.weight.detach().clone(), "fc.bias": fc.bias.detach().clone()})
    torch.save(backbone, layout.resnet18)
    torch.save(net.state_dict(), layout.face_parse)
    log.info("wrote tiny face parser to %s", layout.face_parse.parent)


def write_tiny_gfpgan(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write a GFPGANv1Clean as ``{"params_ema": ...}``: shrunk plus its architecture JSON, or full-size."""
    layout.gfpgan.parent.mkdir(parents=True, exist_ok=True)
    args = dict(GFPGAN_V14_ARCH) if full_size else {**GFPGAN_V14_ARCH, **TINY_GFPGAN_ARCH}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = gfpgan_arch_class()(**args).eval()
        # StyleConv noise strengths start at 0; trained ones are not, so give them a random strength.
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name.endswith(".weight") and param.shape == (1,):
                    param.uniform_(0.05, 0.2)
    torch.save({"params_ema": net.state_dict()}, layout.gfpgan)
    override = layout.gfpgan.with_suffix(".json")
    if full_size:
        override.unlink(missing_ok=True)
    else:
        override.write_text(json.dumps(TINY_GFPGAN_ARCH, indent=2) + "\n")
    log.info("wrote %s GFPGAN to %s", "full-size" if full_size else "tiny", layout.gfpgan.parent)


def write_tiny_blend_models(layout: ModelLayout, seed: int, *, full_size: bool = False) -> None:
    """Write every blend/enhance stand-in below ``layout.root``."""
    write_tiny_face_parser(layout, seed, full_size=full_size)
    write_tiny_gfpgan(layout, seed + 1, full_size=full_size)
