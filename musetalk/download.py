"""Fetch every real weight file into the models layout (command line: ``python -m scripts.download_models``).

``plan_downloads`` is pure: it lists what is missing (or the wrong size), where it goes and where it
comes from. ``fetch`` runs one entry: Hugging Face files through ``huggingface_hub``, plain URLs through
urllib with resume (HTTP Range into ``<file>.part``), then size/sha256 checks and an atomic rename.
Files already present with the right size are skipped, so running it again is cheap. ``download`` does
all of it for one models directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError

from musetalk.layout import ModelLayout
from shards.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

GROUPS = ("unet", "vae", "whisper", "face_parse", "face_alignment", "gfpgan", "syncnet")
MUSETALK_REPO = "TMElyralab/MuseTalk"
VAE_REPO = "stabilityai/sd-vae-ft-mse"
WHISPER_REPO = "openai/whisper-tiny"
# Upstream fetches 79999_iter.pth from Google Drive (id 154JgKpzCPW82qINcVieuPH3fZ2e0P812); this public
# mirror serves the same bytes (sha256 below, also that of facexlib's parsing_bisenet.pth release).
FACE_PARSE_REPO = "ManyOtherFunctions/face-parse-bisent"
RESNET18_URL = "https://download.pytorch.org/models/resnet18-5c106cde.pth"
FAN_BASE_URL = "https://www.adrianbulat.com/downloads/python-fan/"  # as in face_alignment's own source
GFPGAN_URL = "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth"
# joonson/syncnet_python's download_model.sh; no checksum is published (size and hash unchecked).
SYNCNET_URL = "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Download:
    """One file to fetch: from ``source`` (a URL, or a path inside the Hugging Face ``repo_id``) to ``dest``."""

    group: str
    dest: Path
    source: str
    repo_id: str | None = None
    size: int | None = None
    sha256: str | None = None  # the full hex digest, or a prefix of it
    fallback: Download | None = None  # tried when the repo has no ``source`` (.bin instead of .safetensors)

    @property
    def origin(self) -> str:
        return f"hf://{self.repo_id}/{self.source}" if self.repo_id else self.source


def hash_prefix(name: str) -> str | None:
    """The sha256 prefix torch-hub style names embed: ``s3fd-619a316812.pth`` -> ``619a316812``."""
    match = _HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, size: int | None, sha256: str | None) -> str | None:
    """What is wrong with ``path`` (missing, size, sha256 or sha256 prefix), or None when it checks out."""
    if not path.is_file():
        return f"{path} does not exist"
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"{path} is {actual_size} bytes, expected {size}"
    if sha256 is not None:
        actual = sha256_of(path)
        if not actual.startswith(sha256.lower()):
            return f"{path} has sha256 {actual}, expected {sha256}{'...' if len(sha256) < 64 else ''}"
    return None


def is_present(item: Download) -> bool:
    """Cheap idempotence check (existence and size; hashes are verified right after each download)."""
    if item.dest.is_file() and (item.size is None or item.dest.stat().st_size == item.size):
        return True
    return item.fallback is not None and is_present(item.fallback)


def _hub(group: str, repo_id: str, source: str, dest: Path, **kw) -> Download:
    return Download(group, dest, source, repo_id=repo_id, **kw)


def _url(group: str, url: str, dest: Path, size: int | None = None, sha256: str | None = None) -> Download:
    return Download(group, dest, url, size=size, sha256=sha256 or hash_prefix(dest.name))


def all_downloads(layout: ModelLayout) -> list[Download]:
    """Every weight file of the layout and where it comes from."""
    vae, whisper = layout.vae_dir, layout.whisper_dir
    return [
        _hub("unet", MUSETALK_REPO, "musetalkV15/musetalk.json", layout.unet_config),
        _hub(
            "unet",
            MUSETALK_REPO,
            "musetalkV15/unet.pth",
            layout.unet_weights,
            size=3_400_074_924,
            sha256="7ebf6c98c181e20838e4c0054e96e944ac60d5d692cc01db42839fe11b787007",
        ),
        _hub("vae", VAE_REPO, "config.json", vae / "config.json"),
        _hub(
            "vae",
            VAE_REPO,
            "diffusion_pytorch_model.safetensors",
            vae / "diffusion_pytorch_model.safetensors",
            fallback=_hub(
                "vae",
                VAE_REPO,
                "diffusion_pytorch_model.bin",
                vae / "diffusion_pytorch_model.bin",
                size=334_707_217,
                sha256="1b4889b6b1d4ce7ae320a02dedaeff1780ad77d415ea0d744b476155c6377ddc",
            ),
        ),
        _hub("whisper", WHISPER_REPO, "config.json", whisper / "config.json"),
        _hub(
            "whisper",
            WHISPER_REPO,
            "model.safetensors",
            whisper / "model.safetensors",
            fallback=_hub("whisper", WHISPER_REPO, "pytorch_model.bin", whisper / "pytorch_model.bin"),
        ),
        _hub("whisper", WHISPER_REPO, "preprocessor_config.json", whisper / "preprocessor_config.json"),
        _hub(
            "face_parse",
            FACE_PARSE_REPO,
            "79999_iter.pth",
            layout.face_parse,
            size=53_289_463,
            sha256="468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
        ),
        _url(
            "face_parse",
            RESNET18_URL,
            layout.resnet18,
            size=46_827_520,
            sha256="5c106cde386e87d4033832f2996f5493238eda96ccf559d1d62760c4de0613f8",
        ),
        _url("face_alignment", FAN_BASE_URL + layout.s3fd.name, layout.s3fd),
        _url("face_alignment", FAN_BASE_URL + layout.fan.name, layout.fan),
        _url(
            "gfpgan",
            GFPGAN_URL,
            layout.gfpgan,
            size=348_632_874,
            sha256="e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
        ),
        _url("syncnet", SYNCNET_URL, layout.syncnet),
    ]


def plan_downloads(layout: ModelLayout, only: list[str] | None = None) -> list[Download]:
    """The downloads still needed (missing or wrong size), optionally restricted to some ``GROUPS``."""
    unknown = sorted(set(only or []) - set(GROUPS))
    if unknown:
        raise ConfigError(f"unknown model group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    wanted = [d for d in all_downloads(layout) if only is None or d.group in only]
    return [d for d in wanted if not is_present(d)]


def _verify_and_place(item: Download, staged: Path) -> None:
    problem = check_file(staged, item.size, item.sha256)
    if problem:
        staged.unlink()
        raise WeightsError(f"download of {item.origin} is corrupt ({problem}); run the command again")
    item.dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, item.dest)


def _fetch_hub(item: Download, repo_id: str, staging: Path) -> None:
    try:
        staged = Path(hf_hub_download(repo_id, item.source, local_dir=staging / repo_id))
    except RemoteEntryNotFoundError as err:
        if item.fallback is None:
            raise WeightsError(
                f"{item.origin} does not exist on the Hub ({err}); the repo layout changed"
            ) from err
        log.info("%s not on the Hub, trying %s", item.source, item.fallback.source)
        fetch(item.fallback, staging)
        return
    except (HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"could not download {item.origin}: {first}; check the network and run again"
        ) from err
    _verify_and_place(item, staged)


def _fetch_url(item: Download, timeout: float = 60.0) -> None:
    part = item.dest.with_name(item.dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if item.size is not None and have > item.size:
        part.unlink()
        have = 0
    headers = {"User-Agent": "musetalk-farm-downloader"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(item.source, headers=headers), timeout=timeout
        ) as resp:
            resumed = have > 0 and resp.status == 206
            if have and not resumed:
                log.info("%s: server ignored the range request, starting over", item.dest.name)
            with part.open("ab" if resumed else "wb") as out:
                shutil.copyfileobj(resp, out, _CHUNK)
    except urllib.error.HTTPError as err:
        # 416 on a resumed request: the .part already holds the whole file; the checks below decide.
        complete = err.code == 416 and have > 0 and (item.size is None or have == item.size)
        if not complete:
            raise WeightsError(
                f"could not download {item.source}: HTTP {err.code} {err.reason}; check the URL and run again"
            ) from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise WeightsError(
            f"could not download {item.source}: {err}; check the network and run again (resumes from {part})"
        ) from err
    _verify_and_place(item, part)


def fetch(item: Download, staging: Path) -> None:
    """Download one entry into place (``staging`` holds the Hub's partial files and metadata)."""
    log.info("fetching %s -> %s", item.origin, item.dest)
    if item.repo_id:
        _fetch_hub(item, item.repo_id, staging)
    else:
        _fetch_url(item)


def download(layout: ModelLayout, only: list[str] | None = None, *, dry_run: bool = False) -> list[Download]:
    """Fetch every file of ``layout`` still missing (optionally only some ``GROUPS``); returns that plan.

    A failed file does not stop the others, so one run fetches all it can; then a WeightsError says how
    many failed (each one's reason is logged). ``dry_run`` only logs the plan.
    """
    plan = plan_downloads(layout, only)
    if not plan:
        log.info("all model files are present under %s", layout.root)
        return plan
    for item in plan:
        log.info("%s %s <- %s", "would fetch" if dry_run else "to fetch:", item.dest, item.origin)
    if dry_run:
        return plan
    failed = 0
    for item in plan:
        try:
            fetch(item, layout.root / ".download")
        except WeightsError as err:
            failed += 1
            log.error("error: %s", err)
    if failed:
        raise WeightsError(
            f"{failed} of {len(plan)} downloads into {layout.root} failed; run the same command again to retry"
        )
    log.info("done: %d files under %s", len(plan), layout.root)
    return plan
