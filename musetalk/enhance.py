"""GFPGAN v1.4 face enhancement behind one small adapter.

``import gfpgan`` cannot work here (its package root needs torchvision, basicsr and facexlib), but its
``GFPGANv1Clean`` architecture needs only torch plus two tiny basicsr names. :func:`gfpgan_arch_class`
loads ``gfpgan/archs/stylegan2_clean_arch.py`` and ``gfpgan/archs/gfpganv1_clean_arch.py`` straight
from the installed package's files under a private package name, never executing ``gfpgan/__init__.py``
or ``gfpgan/archs/__init__.py``. When the real basicsr is not importable, stand-ins for
``ARCH_REGISTRY`` (``register()`` returns the class unchanged) and ``default_init_weights`` (basicsr's
scaled Kaiming init) are visible in ``sys.modules`` only while those two files execute.

Weights: ``GFPGANv1.4.pth`` stores the state dict under ``params_ema`` (else ``params``). The
architecture is :data:`GFPGAN_V14_ARCH` (GFPGANer's ``arch='clean'`` arguments for v1.4), overridden
key by key by an optional JSON object next to the weights with the same stem (``GFPGANv1.4.json``):
the tiny stand-in weights use it to shrink ``narrow`` and ``num_style_feat``.

Inference follows ``GFPGANer.enhance`` for aligned faces (512x512 RGB in [-1, 1],
``net(x, return_rgb=False, weight=0.5)[0]``, clamp to [-1, 1] back to uint8) with one deliberate
change: ``randomize_noise=False`` uses the noise maps stored in the checkpoint instead of fresh random
noise, so the output is deterministic (and therefore independent of sharding).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import init
from torch.nn.modules.batchnorm import _BatchNorm

from musetalk.device import is_device_failure, upload
from musetalk.layout import ModelLayout
from musetalk.resample import resize_lanczos4
from shards.errors import ConfigError

log = logging.getLogger(__name__)

GFPGAN_V14_ARCH = dict(
    out_size=512,
    num_style_feat=512,
    channel_multiplier=2,
    decoder_load_path=None,
    fix_decoder=False,
    num_mlp=8,
    input_is_latent=True,
    different_w=True,
    narrow=1,
    sft_half=True,
)
GFPGAN_INSTALL_HINT = "enhance=gfpgan needs the gfpgan package: pip install --no-deps gfpgan==1.3.8"
FACE_SIZE = 256  # generated faces
NET_SIZE = 512  # GFPGAN's input/output size
UPSCALES = (1, 2, 4)
_PRIVATE_PACKAGE = "_musetalk_gfpgan_archs"


class _PassThroughRegistry:
    """Stand-in for basicsr's ``ARCH_REGISTRY``: ``@register()`` returns the class unchanged."""

    def register(self, obj: type | None = None) -> Callable[[type], type] | type:
        if obj is not None:
            return obj
        return lambda cls: cls


@torch.no_grad()
def _default_init_weights(
    module_list: nn.Module | list[nn.Module], scale: float = 1, bias_fill: float = 0, **kwargs: object
) -> None:
    """basicsr's ``default_init_weights``: Kaiming-normal Conv2d/Linear weights times ``scale``,
    biases filled with ``bias_fill``; BatchNorm weights 1."""
    modules = module_list if isinstance(module_list, list) else [module_list]
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                init.kaiming_normal_(m.weight, **kwargs)
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.fill_(bias_fill)
            elif isinstance(m, _BatchNorm):
                init.constant_(m.weight, 1)
                if m.bias is not None:
                    m.bias.fill_(bias_fill)


def _real_basicsr_importable() -> bool:
    try:
        import basicsr.archs.arch_util  # noqa: F401
        import basicsr.utils.registry  # noqa: F401
    except (ImportError, RuntimeError, AttributeError) as err:
        log.debug("real basicsr not importable (%s); using the adapter's stand-ins", err)
        return False
    return True


@contextmanager
def _basicsr_stand_ins() -> Iterator[None]:
    """Expose minimal ``basicsr.utils.registry`` / ``basicsr.archs.arch_util`` modules, then remove them."""
    names = ("basicsr", "basicsr.utils", "basicsr.utils.registry", "basicsr.archs", "basicsr.archs.arch_util")
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    fakes = {name: types.ModuleType(name) for name in names}
    for name in ("basicsr", "basicsr.utils", "basicsr.archs"):
        fakes[name].__path__ = []  # mark as packages
    fakes["basicsr.utils.registry"].ARCH_REGISTRY = _PassThroughRegistry()
    fakes["basicsr.archs.arch_util"].default_init_weights = _default_init_weights
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)


def _gfpgan_archs_dir() -> Path:
    spec = importlib.util.find_spec("gfpgan")  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(GFPGAN_INSTALL_HINT)
    archs = Path(next(iter(spec.submodule_search_locations))) / "archs"
    for name in ("stylegan2_clean_arch.py", "gfpganv1_clean_arch.py"):
        if not (archs / name).is_file():
            raise ConfigError(f"{GFPGAN_INSTALL_HINT} (installed copy lacks {archs / name})")
    return archs


def _exec_arch_module(archs: Path, stem: str) -> types.ModuleType:
    name = f"{_PRIVATE_PACKAGE}.{stem}"
    spec = importlib.util.spec_from_file_location(name, archs / f"{stem}.py")
    if spec is None or spec.loader is None:
        raise ConfigError(f"{GFPGAN_INSTALL_HINT} (cannot load {archs / stem}.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so gfpganv1_clean_arch's `from .stylegan2_clean_arch import ...` resolves
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@functools.cache
def gfpgan_arch_class() -> type:
    """The installed gfpgan's ``GFPGANv1Clean`` class, loaded without importing the ``gfpgan`` package."""
    archs = _gfpgan_archs_dir()
    package = types.ModuleType(_PRIVATE_PACKAGE)
    package.__path__ = [str(archs)]
    sys.modules[_PRIVATE_PACKAGE] = package
    if _real_basicsr_importable():
        _exec_arch_module(archs, "stylegan2_clean_arch")
        module = _exec_arch_module(archs, "gfpganv1_clean_arch")
    else:
        with _basicsr_stand_ins():
            _exec_arch_module(archs, "stylegan2_clean_arch")
            module = _exec_arch_module(archs, "gfpganv1_clean_arch")
    return module.GFPGANv1Clean


def _arch_args(layout: ModelLayout, weights: Path) -> dict[str, object]:
    args = dict(GFPGAN_V14_ARCH)
    override = weights.with_suffix(".json")
    if override.exists():
        what = "GFPGAN architecture override"
        try:
            data = json.loads(override.read_text())
        except (OSError, ValueError) as err:
            raise layout.malformed(override, what, f"not readable JSON ({err})") from err
        if not isinstance(data, dict) or not set(data) <= set(GFPGAN_V14_ARCH):
            unknown = sorted(set(data) - set(GFPGAN_V14_ARCH)) if isinstance(data, dict) else data
            raise layout.malformed(
                override, what, f"expected an object with GFPGANv1Clean arguments, got {unknown}"
            )
        args.update(data)
    return args


def enhance_batch(device_type: str) -> int:
    """Faces per GFPGAN call on a device type: one on a CPU (its StyleGAN2 convolutions group by batch, so
    rounding would follow the batch; the serial renderer's faces stay bit-identical), a fixed padded
    batch of 8 on a GPU (one launch sequence and one download per batch instead of two syncs per face)."""
    return 8 if device_type == "cuda" else 1


def load_gfpgan(
    layout: ModelLayout, device: torch.device, upscale: int = 1, dtype: torch.dtype = torch.float32
) -> FaceEnhancer:
    """Load ``GFPGANv1.4.pth`` (``params_ema``, else ``params``) strictly into ``GFPGANv1Clean``, to run in
    ``dtype`` (``render.dtype`` on CUDA; float32 on a CPU) in batches of :func:`enhance_batch`."""
    what = "GFPGAN v1.4 weights"
    path = layout.require(layout.gfpgan, what)
    if upscale not in UPSCALES:  # fail before the slow model build
        raise ConfigError(f"enhance.upscale must be one of {UPSCALES}, got {upscale}")
    args = _arch_args(layout, path)
    state = layout.load_torch_state(path, what, under=("params_ema", "params"))
    try:
        net = gfpgan_arch_class()(**args)
    except (TypeError, ValueError, RuntimeError) as err:
        raise layout.malformed(path, what, f"cannot build GFPGANv1Clean({args}): {err}") from err
    layout.check_state_dict(path, what, state, net.state_dict(), context=f"for architecture {args}")
    net.load_state_dict(state, strict=True)
    log.info("loaded GFPGAN from %s on %s (%s)", path, device, dtype)
    return FaceEnhancer(net, device, upscale, batch_size=enhance_batch(device.type), dtype=dtype)


class FaceEnhancer:
    """GFPGAN on generated faces in fixed-size batches (the last one padded by repeating its last face, so
    a face's result never depends on its batch mates), with a per-face fallback: a batch that raises
    (anything but a device failure, which is raised) is rerun face by face, and a face that still fails or
    comes out non-finite gets a Lanczos resize."""

    def __init__(
        self,
        net: nn.Module,
        device: torch.device,
        upscale: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if upscale not in UPSCALES:
            raise ConfigError(f"enhance.upscale must be one of {UPSCALES}, got {upscale}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net = net.to(device, dtype).eval()
        self.device = device
        self.dtype = dtype
        self.upscale = upscale
        self.batch_size = batch_size
        self.out_size = FACE_SIZE * upscale

    def _fallback(self, face: np.ndarray) -> np.ndarray:
        if face.shape[0] == self.out_size:
            return face.copy()
        return resize_lanczos4(face, (self.out_size, self.out_size))

    def _run_batch(self, faces: list[np.ndarray]) -> list[np.ndarray | None]:
        """(256, 256, 3) uint8 BGR faces -> (out, out, 3) uint8 BGR each, None where GFPGAN's output is not
        finite. One padded forward pass, one download of the faces and their finiteness."""
        n = len(faces)
        rgb = [
            cv2.cvtColor(
                cv2.resize(f, (NET_SIZE, NET_SIZE), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB
            )
            for f in faces
        ]
        rgb += [rgb[-1]] * (self.batch_size - n)
        x = upload(torch.from_numpy(np.stack(rgb)), self.device).permute(0, 3, 1, 2).float().contiguous()
        x = x.div_(255.0).sub_(0.5).div_(0.5).to(self.dtype)  # NCHW: GFPGAN views its features flat
        y = self.net(x, return_rgb=False, weight=0.5, randomize_noise=False)[0][:n].float()
        finite = torch.isfinite(y).flatten(1).all(dim=1)
        y = (y.clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0
        y = torch.cat([y.round().byte().permute(0, 2, 3, 1).flatten(1), finite[:, None].byte()], dim=1)
        host = y.cpu().numpy()
        out: list[np.ndarray | None] = []
        for row in host:
            if not row[-1]:
                out.append(None)
                continue
            restored = cv2.cvtColor(row[:-1].reshape(NET_SIZE, NET_SIZE, 3), cv2.COLOR_RGB2BGR)
            size = (self.out_size, self.out_size)
            if self.out_size < NET_SIZE:
                restored = cv2.resize(restored, size, interpolation=cv2.INTER_AREA)
            elif self.out_size > NET_SIZE:
                restored = resize_lanczos4(restored, size)
            out.append(restored)
        return out

    def _attempt(self, faces: list[np.ndarray]) -> tuple[list[np.ndarray | None], list[str]]:
        """:meth:`_run_batch`, rerun face by face when the batch raises (a device failure is raised)."""
        try:
            return self._run_batch(faces), ["non-finite output"] * len(faces)
        except RuntimeError as err:
            if is_device_failure(err):
                raise
            if len(faces) == 1:
                return [None], [f"{type(err).__name__}: {err}"]
        results, problems = [], []
        for face in faces:
            one, problem = self._attempt([face])
            results += one
            problems += problem
        return results, problems

    @torch.inference_mode()
    def restore(self, faces: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """(N, 256, 256, 3) uint8 BGR -> ((N, 256*u, 256*u, 3) uint8 BGR, per face: fell back to Lanczos)."""
        if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or faces.dtype != np.uint8:
            raise ValueError(
                f"enhance needs (N, {FACE_SIZE}, {FACE_SIZE}, 3) uint8 BGR, got {faces.shape} {faces.dtype}"
            )
        out = np.empty((len(faces), self.out_size, self.out_size, 3), dtype=np.uint8)
        fell = [False] * len(faces)
        for start in range(0, len(faces), self.batch_size):
            chunk = list(faces[start : start + self.batch_size])
            results, problems = self._attempt(chunk)
            for i, (restored, problem) in enumerate(zip(results, problems, strict=True), start):
                if restored is None:
                    fell[i] = True
                    log.warning(
                        "GFPGAN failed on face %d of %d (%s); using a Lanczos resize", i, len(faces), problem
                    )
                    restored = self._fallback(faces[i])
                out[i] = restored
        return out, fell

    def enhance(self, faces: np.ndarray) -> tuple[np.ndarray, int]:
        """(N, 256, 256, 3) uint8 BGR -> ((N, 256*u, 256*u, 3) uint8 BGR, faces that fell back to Lanczos)."""
        out, fell = self.restore(faces)
        return out, sum(fell)
