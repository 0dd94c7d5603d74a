"""MuseTalk 1.5 latent generation: load the UNet and the VAE, encode face crops, generate mouths.

The maths follows upstream (see DESIGN.md): masked + reference crops are VAE-encoded (distribution
mode, scaled by 0.18215) into an 8-channel latent, the UNet runs once at timestep 0 with the audio
prompt as cross-attention context, and the VAE decodes its 4-channel output back to a 256x256 face.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import is_accelerate_available

from musetalk.device import upload
from musetalk.entries import Entry
from musetalk.layout import ModelLayout
from musetalk.stats import model_call

log = logging.getLogger(__name__)

UNET_SCALE = 0.18215  # VAE latent scaling
CROP_SIZE = 256
LATENT_SIZE = CROP_SIZE // 8
MASK_TOP = CROP_SIZE // 2  # rows [128, 256) of the masked copy are blanked
AUDIO_TOKENS = 50
AUDIO_DIM = 384
VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_unet(layout: ModelLayout, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """Build the MuseTalk UNet from ``musetalk.json`` and load ``unet.pth`` (a plain state dict) strictly."""
    config_path = layout.require(layout.unet_config, "MuseTalk UNet config")
    weights_path = layout.require(layout.unet_weights, "MuseTalk UNet weights")
    what = "MuseTalk UNet config"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise layout.malformed(config_path, what, f"not readable JSON ({_one_line(err)})") from err
    if not isinstance(raw, dict):
        raise layout.malformed(config_path, what, f"expected a JSON object, got {type(raw).__name__}")
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    # Built on the meta device: no random init of ~850M parameters, no second copy in memory.
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise layout.malformed(
            config_path, what, f"not a UNet2DConditionModel config ({_one_line(err)})"
        ) from err

    state = layout.load_torch_state(weights_path, "MuseTalk UNet weights")
    layout.check_state_dict(
        weights_path,
        "MuseTalk UNet weights",
        state,
        unet.state_dict(),
        context=f"for the UNet of {config_path.name}",
    )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    unet.load_state_dict(state, strict=True, assign=True)
    unet.eval().requires_grad_(False)
    log.info("loaded MuseTalk UNet from %s (%s on %s)", weights_path, dtype, device)
    return unet.to(device)


def load_vae(layout: ModelLayout, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """Load the sd-vae-ft-mse ``AutoencoderKL`` from ``layout.vae_dir`` (config.json + diffusers weights)."""
    vae_dir = layout.require(layout.vae_dir, "VAE directory")
    layout.require(vae_dir / "config.json", "VAE config")
    weights = [vae_dir / name for name in VAE_WEIGHT_FILES if (vae_dir / name).exists()]
    if not weights:
        layout.require(vae_dir / VAE_WEIGHT_FILES[0], "VAE weights")
    try:
        vae, info = AutoencoderKL.from_pretrained(
            vae_dir,
            local_files_only=True,
            output_loading_info=True,
            torch_dtype=dtype,
            low_cpu_mem_usage=is_accelerate_available(),
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise layout.malformed(vae_dir, "VAE", _one_line(err)) from err
    layout.check_keys(
        weights[0],
        "VAE weights",
        missing=info.get("missing_keys", []),
        unexpected=info.get("unexpected_keys", []),
        wrong_shapes=info.get("mismatched_keys", []),
    )
    vae.eval().requires_grad_(False)
    log.info("loaded VAE from %s (%s on %s)", weights[0], dtype, device)
    return vae.to(device)


def _batch(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def _spans(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last item so the batch has exactly ``size`` items (every kernel sees one shape)."""
    if batch.shape[0] == size:
        return batch
    filler = batch[-1:].expand(size - batch.shape[0], *batch.shape[1:])
    return torch.cat([batch, filler])


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=module._input_format), *args[1:])


def _batch_invariant(*models: torch.nn.Module, channels_last: bool = False) -> None:
    """Feed every GroupNorm of ``models`` a contiguous input, from now on (registered once per module):
    NCHW, or channels-last when the models run channels-last (``render.channels_last``, GPU only: an NCHW
    copy there would undo the format at every GroupNorm; whether CUDA's channels-last GroupNorm is
    batch-invariant is what ``scripts/gpu_check.py``'s invariance section measures).

    diffusers' attention blocks hand back channels-last views; PyTorch's CPU GroupNorm kernel for
    channels-last splits its reductions across threads by position in the whole batch, so an item's
    result would depend on where it sits in the batch. The NCHW kernel reduces each (item, group) in
    one thread. Measured on torch 2.13 CPU: the tiny VAE's mid-block differs by ~1e-6 without this.
    The hooks stay: a worker runs units in several threads over one VAE (preparation encodes while a
    shard decodes), and adding or removing hooks while another thread runs the module is a race.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module._input_format = fmt  # read by the hook at each call
                if not getattr(module, "_contiguous_input", False):
                    module.register_forward_pre_hook(_contiguous_input)
                    module._contiguous_input = True


class PendingFaces:
    """Faces :meth:`LatentGenerator.launch` queued: ``host`` ((N, 256, 256, 3) uint8 BGR, pinned on CUDA)
    is filled when ``done`` (a CUDA event after the download, None off CUDA: already filled) has passed."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        self._host = host
        self._done = done

    def result(self) -> np.ndarray:
        """Wait for this launch's download only (not for work queued after it) -> (N, 256, 256, 3) uint8."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()


class LatentGenerator:
    """Runs MuseTalk 1.5's VAE + UNet on 256x256 face crops, in fixed-size batches.

    Every call is split into batches of exactly ``batch_size`` (the last one padded by repeating its
    last item, the padding dropped), so kernels always see the same shapes and an item's result never
    depends on which other items share its batch: output is bit-identical however a video is sharded.
    ``dtype`` is the UNet's compute dtype; the VAE may be in its own (a float32 VAE beside an fp16 UNet works).
    Keep ``torch.backends.cudnn.benchmark`` off: autotuning may pick different kernels per process.
    ``channels_last``: the models were moved to the channels-last memory format (GPU only).
    ``batch_size`` is the default of :meth:`encode` and :meth:`generate`, which take a job's own: the weights
    do not depend on it, so a worker keeps its loaded models when a job changes ``render.batch_size``.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        channels_last: bool = False,
    ) -> None:
        _batch(batch_size)
        if unet.dtype != dtype:
            raise ValueError(f"the UNet is in {unet.dtype} but dtype={dtype}; load it with the same dtype")
        _batch_invariant(unet, vae, channels_last=channels_last)
        self.unet = unet
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        # timestep 0 as a device tensor made once: a Python int costs a host-to-device copy per call
        # inside diffusers (int64 as diffusers makes it; int32 on MPS, as its maybe_adjust_dtype_for_device)
        self._timestep = torch.zeros(
            1, dtype=torch.int32 if device.type == "mps" else torch.int64, device=device
        )
        # a compiled UNet compiles at its first call: one unit thread compiles, the others wait
        self._first_call = threading.Lock()
        self._warm = True

    def compile(self) -> None:
        """``torch.compile`` the UNet (``render.compile``; changes rounding). The first call compiles,
        under a lock: two unit threads never compile at once."""
        self.unet = torch.compile(self.unet)
        self._warm = False

    @torch.inference_mode()
    def encode(self, crops: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        """(N, 256, 256, 3) uint8 BGR crops -> (N, 8, 32, 32) float32 CPU latents [masked, reference], in
        batches of ``batch_size`` (the loaded default when None)."""
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
            raise ValueError(f"crops must be (N, 256, 256, 3) uint8, got {crops.shape} {crops.dtype}")
        batch_size = _batch(self.batch_size if batch_size is None else batch_size)
        out = torch.empty((len(crops), 8, LATENT_SIZE, LATENT_SIZE), dtype=torch.float32)
        for start, stop in _spans(len(crops), batch_size):
            batch = _pad(torch.from_numpy(np.ascontiguousarray(crops[start:stop])), batch_size)
            out[start:stop] = self._encode_batch(batch)[: stop - start].float().cpu()
        return out

    @torch.inference_mode()
    def generate(
        self, latents: torch.Tensor, audio: torch.Tensor, batch_size: int | None = None
    ) -> np.ndarray:
        """(N, 8, 32, 32) latents + (N, 50, 384) audio prompts (positional encoding added) -> (N, 256, 256, 3)
        uint8 BGR, in batches of ``batch_size`` (the loaded default when None)."""
        return self.launch(latents, audio, batch_size).result()

    @torch.inference_mode()
    def launch(
        self, latents: torch.Tensor, audio: torch.Tensor, batch_size: int | None = None
    ) -> PendingFaces:
        """:meth:`generate`, without waiting: on CUDA the inputs go up pinned and non-blocking, every batch
        and the faces' download into pinned host memory are queued on the current stream, and the call
        returns at once, so the caller can queue the next batch before it waits for this one
        (:meth:`PendingFaces.result`). Elsewhere the work is done when it returns: the same maths."""
        if latents.ndim != 4 or latents.shape[1:] != (8, LATENT_SIZE, LATENT_SIZE):
            raise ValueError(f"latents must be (N, 8, 32, 32), got {tuple(latents.shape)}")
        if audio.shape != (len(latents), AUDIO_TOKENS, AUDIO_DIM):
            raise ValueError(
                f"audio must be ({len(latents)}, 50, 384) to match latents, got {tuple(audio.shape)}"
            )
        batch_size = _batch(self.batch_size if batch_size is None else batch_size)
        cuda = self.device.type == "cuda"
        host = torch.empty((len(latents), CROP_SIZE, CROP_SIZE, 3), dtype=torch.uint8, pin_memory=cuda)
        latents, audio = upload(latents, self.device), upload(audio, self.device)
        for start, stop in _spans(len(latents), batch_size):
            faces = self._generate_batch(
                _pad(latents[start:stop], batch_size), _pad(audio[start:stop], batch_size)
            )
            host[start:stop].copy_(faces[: stop - start], non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        return PendingFaces(host, done)

    def _encode_batch(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 256, 256, 3) uint8 BGR -> (B, 8, 32, 32) latents [masked, reference] on the device."""
        rgb = upload(crops, self.device).flip(-1).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        masked = rgb.clone()
        masked[:, :, MASK_TOP:, :] = 0.0  # blanked before normalising, so those rows become -1
        halves = [
            self.vae.encode(((x - 0.5) / 0.5).to(self.vae.dtype)).latent_dist.mode() * UNET_SCALE
            for x in (masked, rgb)
        ]
        return torch.cat(halves, dim=1)

    def _generate_batch(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """(B, 8, 32, 32) + (B, 50, 384) -> (B, 256, 256, 3) uint8 BGR on the device."""
        x = latents.to(self.device, self.dtype)
        context = audio.to(self.device, self.dtype)
        if self._warm:
            pred = self.unet(x, timestep=self._timestep, encoder_hidden_states=context).sample
        else:
            with self._first_call:
                pred = self.unet(x, timestep=self._timestep, encoder_hidden_states=context).sample
                self._warm = True
        image = self.vae.decode((pred / UNET_SCALE).to(self.vae.dtype)).sample.float()
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).flip(-1)


@dataclass(eq=False)
class Generated:
    """One output frame after generation: its source frame's entry and, with a face, the generated face."""

    t: int
    entry: Entry
    face: np.ndarray | None = None  # (256 * upscale, 256 * upscale, 3) uint8 BGR
    enhance_failed: bool = False


def generate_faces(
    entries: Iterable[tuple[int, Entry]],
    generator: LatentGenerator,
    enhancer,
    windows: Callable[[list[int]], torch.Tensor],
    clock,
    batch_size: int,
) -> Iterator[Generated]:
    """A shard's generation: (output frame, entry) in order -> one :class:`Generated` each, in order.

    Batches close at ``batch_size`` faces, at twice that many frames, or at the end (a fixed rule: which
    frames share a UNet batch never changes; padding keeps each face independent of its batch mates
    anyway). One batch is in flight: batch N+1 is launched (:meth:`LatentGenerator.launch`, queued on the
    current stream) before batch N's faces are waited for, so on CUDA the device never idles while this
    thread waits. ``enhancer`` (a :class:`musetalk.enhance.FaceEnhancer` or None) runs on each batch and
    says which faces fell back; ``windows(ts)`` gives the audio prompts, ``clock`` the stage times.
    """

    def launch(pending: list[tuple[int, Entry]]) -> tuple[list[tuple[int, Entry]], PendingFaces | None]:
        faces = [(t, e) for t, e in pending if e.box is not None]
        if not faces:
            return pending, None
        with clock.stage("generate", device=True):
            latents = torch.from_numpy(np.stack([e.latents for _, e in faces]))
            prompts = windows([t for t, _ in faces])
            with model_call():
                return pending, generator.launch(latents, prompts, batch_size)

    def land(pending: list[tuple[int, Entry]], launched: PendingFaces | None) -> Iterator[Generated]:
        ts = [t for t, e in pending if e.box is not None]
        out, failed = {}, set()
        if launched is not None:
            with model_call():
                generated = launched.result()
            if enhancer is not None:
                with clock.stage("enhance", device=True), model_call():
                    generated, fell = enhancer.restore(generated)
                failed = {t for t, f in zip(ts, fell, strict=True) if f}
            out = dict(zip(ts, generated, strict=True))
        for t, e in pending:
            yield Generated(t, e, out.get(t), t in failed)

    pending: list[tuple[int, Entry]] = []
    flight = None
    for t, entry in entries:
        pending.append((t, entry))
        n_faces = sum(e.box is not None for _, e in pending)
        if n_faces >= batch_size or len(pending) >= 2 * batch_size:
            launched = launch(pending)
            if flight is not None:
                yield from land(*flight)
            flight, pending = launched, []
    last = launch(pending) if pending else None
    if flight is not None:
        yield from land(*flight)
    if last is not None:
        yield from land(*last)
