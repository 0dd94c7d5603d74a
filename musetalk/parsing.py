"""BiSeNet face parsing (19 CelebAMask-HQ classes), as MuseTalk uses it to build the blend mask.

The module tree mirrors the official ``79999_iter.pth`` state dict key for key
(``cp.resnet.*``, ``cp.arm16.*``, ``cp.arm32.*``, ``cp.conv_head16/32.*``, ``cp.conv_avg.*``,
``ffm.*``, ``conv_out.*``, ``conv_out16.*``, ``conv_out32.*``), so the file loads strictly.
Class ids: 0 background, 1 skin, 2/3 brows, 4/5 eyes, 6 glasses, 7/8 ears, 9 earring, 10 nose,
11 mouth, 12 upper lip, 13 lower lip, 14 neck, 15 necklace, 16 cloth, 17 hair, 18 hat.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from musetalk.device import upload
from musetalk.layout import ModelLayout
from musetalk.resample import BILINEAR, resize_square

log = logging.getLogger(__name__)

N_CLASSES = 19
PARSE_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_batch(device_type: str) -> int:
    """Crops per BiSeNet call on a device type. On a CPU, batching buys no speed (16 1080p face crops:
    5.50 CPU s one at a time, 5.69 in fours) while its activations grow with the batch (about 45 MiB per
    crop at 512x512: +143 MiB of peak RSS per call in twos, +232 in fours); 2 is the smallest batch whose
    labels matched those of 4 on every crop we compared (1 differs in a few pixels). A GPU gets a GPU-sized
    batch of 16 (a prepare unit parses ``render.batch_size`` crops per call: one launch sequence for them)."""
    return 16 if device_type == "cuda" else 2


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; parameters ``conv.*`` and ``bn.*``."""

    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block with torchvision's parameter names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample``)."""

    def __init__(self, in_chan: int, out_chan: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample: nn.Sequential | None = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chan)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride), BasicBlock(out_chan, out_chan, 1))


class Resnet18(nn.Module):
    """ResNet18 trunk without ``fc``; returns the 1/8, 1/16 and 1/32 feature maps (128, 256, 512 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    """ConvBNReLU whose output is scaled by a channel attention from its global average."""

    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * atten


class ContextPath(nn.Module):
    """ResNet18 features refined top-down: returns (feat8 [128ch], 1/16 head upsampled to 1/8, 1/32 head upsampled to 1/16)."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        global_ctx = self.conv_avg(
            feat32.mean(dim=(2, 3), keepdim=True)
        )  # broadcast = nearest upsampling of 1x1
        up32 = F.interpolate(self.arm32(feat32) + global_ctx, size=feat16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, size=feat8.shape[2:], mode="nearest")
        up16 = self.conv_head16(up16)
        return feat8, up16, up32


class FeatureFusionModule(nn.Module):
    """Concatenate two feature maps, fuse with a 1x1 ConvBNReLU, add a channel-attention-weighted copy."""

    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = feat.mean(dim=(2, 3), keepdim=True)
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(atten))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    """3x3 ConvBNReLU then a 1x1 classifier (``conv.*``, ``conv_out.weight``)."""

    def __init__(self, in_chan: int, mid_chan: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet with a ResNet18 context path (the spatial path replaced by ResNet's 1/8 features).

    ``forward`` takes (B, 3, H, W) float32 ImageNet-normalised RGB and returns the main head's
    (B, n_classes, H, W) logits. The auxiliary heads ``conv_out16``/``conv_out32`` exist only so the
    official checkpoint loads strictly; inference does not run them.
    """

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, cp8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, cp8))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)


def parse_input(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 BGR -> (512, 512, 3) uint8 RGB, resized as upstream: Pillow ``BILINEAR``.

    Pillow's bilinear filter widens its support when shrinking (an antialiased resize), unlike
    OpenCV's ``INTER_LINEAR``; the two differ by several levels, enough to flip labels at edges. A square
    (the blend square always is) goes through :func:`musetalk.resample.resize_square`, Pillow's result
    bit for bit. The filter treats channels alike, so the BGR image is resized and its channels reversed.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"face parsing needs (h, w, 3) uint8 BGR images, got {image.shape} {image.dtype}")
    if image.shape[0] == image.shape[1]:
        resized = resize_square(image, PARSE_SIZE, BILINEAR)
    else:
        resized = np.asarray(
            Image.fromarray(image).resize((PARSE_SIZE, PARSE_SIZE), Image.Resampling.BILINEAR)
        )
    return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)


class FaceParser:
    """Runs a loaded BiSeNet on face crops in fixed-size batches, in ``dtype`` (``render.dtype`` on CUDA,
    float32 on a CPU; the input is normalised in float32 first)."""

    def __init__(
        self, net: nn.Module, device: torch.device, batch_size: int = 4, dtype: torch.dtype = torch.float32
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net = net.to(device, dtype).eval()
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(h, w, 3) uint8 BGR images of any size -> (N, 512, 512) uint8 class ids."""
        return self.labels([parse_input(img) for img in images])

    @torch.inference_mode()
    def labels(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """:func:`parse_input` results ((512, 512, 3) uint8 RGB) -> (N, 512, 512) uint8 class ids.

        Every batch is padded to ``batch_size`` by repeating its last input, so an input's labels
        never depend on which other inputs share its batch.
        """
        out = np.empty((len(inputs), PARSE_SIZE, PARSE_SIZE), dtype=np.uint8)
        for start in range(0, len(inputs), self.batch_size):
            chunk = list(inputs[start : start + self.batch_size])
            n = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - n)
            x = upload(torch.from_numpy(np.stack(chunk)), self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = ((x - self._mean) / self._std).to(self.dtype)
            labels = self.net(x).argmax(dim=1)[:n]
            out[start : start + n] = labels.to(torch.uint8).cpu().numpy()
        return out


def load_face_parser(
    layout: ModelLayout,
    device: torch.device,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> FaceParser:
    """Build BiSeNet as upstream does: ResNet18 ImageNet weights into the backbone (``fc.*`` ignored),
    then the full ``79999_iter.pth`` state dict, strictly. ``batch_size``: :func:`parse_batch` unless given."""
    resnet_what = "ResNet18 ImageNet weights (face-parsing backbone)"
    parse_what = "BiSeNet face-parsing weights"
    resnet_path = layout.require(layout.resnet18, resnet_what)
    parse_path = layout.require(layout.face_parse, parse_what)

    net = BiSeNet(N_CLASSES)
    backbone = net.cp.resnet.state_dict()
    resnet_state = {
        k: v for k, v in layout.load_torch_state(resnet_path, resnet_what).items() if not k.startswith("fc.")
    }
    # torchvision's 2017 file predates BatchNorm's num_batches_tracked buffer.
    untracked = frozenset(k for k in backbone if k.endswith("num_batches_tracked"))
    layout.check_state_dict(resnet_path, resnet_what, resnet_state, backbone, optional=untracked)
    backbone.update(resnet_state)
    net.cp.resnet.load_state_dict(backbone, strict=True)

    state = layout.load_torch_state(parse_path, parse_what)
    current = net.state_dict()
    untracked = frozenset(k for k in current if k.endswith("num_batches_tracked"))
    layout.check_state_dict(parse_path, parse_what, state, current, optional=untracked)
    net.load_state_dict({**{k: current[k] for k in untracked}, **state}, strict=True)
    log.info("loaded BiSeNet face parser from %s on %s (%s)", parse_path, device, dtype)
    return FaceParser(net, device, batch_size or parse_batch(device.type), dtype)
