"""Where every weight file lives under a models directory (the upstream MuseTalk layout).

Loaders call :meth:`ModelLayout.require` so a missing file fails with one line that names
the file, the expected path and the command that fetches it; :meth:`ModelLayout.load_torch_state`
and :meth:`ModelLayout.check_state_dict` do the same for files that exist but do not fit the model.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shards.errors import WeightsError

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

DOWNLOAD_HINT = "python -m scripts.download_models --dir {root}"
TINY_HINT = "python -m scripts.make_tiny_models --dir {root}"
_SHOW = 5  # keys named per kind of problem in a WeightsError


@dataclass(frozen=True)
class ModelLayout:
    """Paths of every model file below ``root`` (``models/`` for real weights, ``models/tiny`` for stand-ins)."""

    root: Path
    fetch_hint: str = DOWNLOAD_HINT

    @classmethod
    def at(cls, root: str | Path, tiny: bool = False) -> ModelLayout:
        return cls(Path(root), TINY_HINT if tiny else DOWNLOAD_HINT)

    # MuseTalk 1.5 UNet: diffusers UNet2DConditionModel config + torch state dict.
    @property
    def unet_config(self) -> Path:
        return self.root / "musetalkV15" / "musetalk.json"

    @property
    def unet_weights(self) -> Path:
        return self.root / "musetalkV15" / "unet.pth"

    # stabilityai/sd-vae-ft-mse, a diffusers AutoencoderKL directory.
    @property
    def vae_dir(self) -> Path:
        return self.root / "sd-vae"

    # openai/whisper-tiny, a transformers model directory (config, weights, preprocessor config).
    @property
    def whisper_dir(self) -> Path:
        return self.root / "whisper"

    # BiSeNet face parsing (19 classes) and the ResNet18 ImageNet weights of its context path.
    @property
    def face_parse(self) -> Path:
        return self.root / "face-parse-bisent" / "79999_iter.pth"

    @property
    def resnet18(self) -> Path:
        return self.root / "face-parse-bisent" / "resnet18-5c106cde.pth"

    # face-alignment's S3FD detector and 2D FAN landmark network (torch hub checkpoint files).
    @property
    def s3fd(self) -> Path:
        return self.root / "face-alignment" / "s3fd-619a316812.pth"

    @property
    def fan(self) -> Path:
        return self.root / "face-alignment" / "2DFAN4-11f355bf06.pth.tar"

    # GFPGAN v1.4 (GFPGANv1Clean, weights under ``params_ema``).
    @property
    def gfpgan(self) -> Path:
        return self.root / "gfpgan" / "GFPGANv1.4.pth"

    # SyncNet (joonson/syncnet_python), the lip-sync scorer of qa.sync: a plain state dict.
    @property
    def syncnet(self) -> Path:
        return self.root / "syncnet" / "syncnet_v2.model"

    def require(self, path: Path, what: str) -> Path:
        """Return ``path`` if it exists, else raise a WeightsError that says how to fetch it."""
        if not path.exists():
            raise WeightsError(
                f"missing {what}: expected {path}; fetch it with `{self.fetch_hint.format(root=self.root)}`"
            )
        return path

    def malformed(self, path: Path, what: str, problem: str) -> WeightsError:
        """A WeightsError for a file that exists but cannot be used."""
        return WeightsError(
            f"malformed {what} at {path}: {problem}; re-fetch it with `{self.fetch_hint.format(root=self.root)}`"
        )

    def load_torch_state(self, path: Path, what: str, *, under: Sequence[str] = ()) -> dict[str, Tensor]:
        """``torch.load`` a state dict of tensors (weights only, onto the CPU) or raise a one-line WeightsError.

        With ``under``, the file holds a dict and the state dict is the value of the first of those keys
        it has (GFPGAN's ``params_ema``, else ``params``).
        """
        import torch  # lazily: scripts that only need paths stay light

        self.require(path, what)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
            raise self.malformed(path, what, f"not a readable torch checkpoint ({_one_line(err)})") from err
        if under:
            key = next((k for k in under if isinstance(state, Mapping) and k in state), None)
            if key is None:
                raise self.malformed(path, what, f"expected a dict with {' or '.join(map(repr, under))}")
            log.debug("%s: using the state dict under %r in %s", what, key, path)
            state = state[key]
        if not isinstance(state, Mapping):
            raise self.malformed(path, what, f"expected a state dict, got {type(state).__name__}")
        bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            kind = type(state[bad]).__name__
            raise self.malformed(path, what, f"expected a state dict of tensors, got {kind} at key {bad!r}")
        return dict(state)

    def check_state_dict(
        self,
        path: Path,
        what: str,
        given: Mapping[str, Tensor],
        expected: Mapping[str, Tensor],
        *,
        optional: frozenset[str] = frozenset(),
        context: str = "",
    ) -> None:
        """Raise a one-line WeightsError unless ``given`` has exactly ``expected``'s keys and shapes.

        Keys in ``optional`` may be missing from ``given`` (BatchNorm's ``num_batches_tracked`` in old
        files). ``context`` is appended to the message (e.g. the architecture the file was checked against).
        """
        self.check_keys(
            path,
            what,
            missing=[k for k in expected if k not in given and k not in optional],
            unexpected=[k for k in given if k not in expected],
            wrong_shapes=[
                (k, given[k].shape, expected[k].shape)
                for k in given
                if k in expected and given[k].shape != expected[k].shape
            ],
            context=context,
        )

    def check_keys(
        self,
        path: Path,
        what: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        wrong_shapes: Iterable[tuple[str, Sequence[int], Sequence[int]]] = (),
        context: str = "",
    ) -> None:
        """Raise a one-line WeightsError naming the first five missing keys, unexpected keys and wrong
        shapes (``key (given) != (expected)``) with their counts; do nothing when all three are empty."""
        shapes = [
            f"{k} {tuple(got)} != {tuple(want)}" for k, got, want in sorted(wrong_shapes, key=lambda s: s[0])
        ]
        problems = [
            f"{len(items)} {label}: {', '.join(items[:_SHOW])}"
            + (f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")
            for label, items in (
                ("missing keys", sorted(missing)),
                ("unexpected keys", sorted(unexpected)),
                ("wrong shapes", shapes),
            )
            if items
        ]
        if problems:
            raise self.malformed(path, what, "; ".join(problems) + (f" {context}" if context else ""))


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (torch's errors span many lines)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
