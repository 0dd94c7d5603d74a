"""Where every weight file lives under a models directory (the upstream MuseTalk layout).

Loaders call :meth:`ModelLayout.require` so a missing file fails with one line that names
the file, the expected path and the command that fetches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shards.errors import WeightsError

DOWNLOAD_HINT = "python -m scripts.download_models --dir {root}"
TINY_HINT = "python -m scripts.make_tiny_models --dir {root}"


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
