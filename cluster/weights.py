"""Model weights under a URI (``models.dir=s3://bucket/models``): checked by the driver, synced per node.

``musetalk`` loads from a local directory only; here the files a pipeline needs are named below the URI,
checked with ``fs.info`` before any worker starts, and copied by each worker node on first use into
``<staging root>/models/<hash of the URI>/`` (see :func:`cluster.storage.sync`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import PurePath

from cluster import storage
from musetalk.config import PipelineConfig
from musetalk.layout import ModelLayout
from shards.errors import WeightsError

logger = logging.getLogger(__name__)


def weight_files(cfg: PipelineConfig, *, sync: bool = False) -> list[tuple[str, str]]:
    """(POSIX path below ``models.dir``, description) of every file ``cfg`` loads: each required file,
    plus the whole directory of the models loaded as directories (VAE, Whisper) when the root is a URI,
    and the lip-sync scorer's weights (``qa.sync``) where they are there (with ``sync``: always, so a check
    reports them missing)."""
    from musetalk.models import required_weights  # imports torch: only when weights are checked

    layout = ModelLayout.at(cfg.models_dir, tiny=cfg.tiny)
    root = layout.root
    files = [(p.relative_to(root).as_posix(), what) for p, what in required_weights(cfg)]
    if storage.is_remote(cfg.models_dir):
        fs, base = storage.open_fs(cfg.models_dir)
        for d in (layout.vae_dir, layout.whisper_dir):
            rel = d.relative_to(root).as_posix()
            with storage.errors(storage.join(cfg.models_dir, rel), "listing"):
                found = fs.find(storage.join(base, rel))
            names = sorted(PurePath(f).relative_to(base.rstrip("/")).as_posix() for f in found)
            files += [(n, f"{d.name} file") for n in names if n not in {f for f, _ in files}]
    # Not needed to render, so optional here: synced to every node (and keyed) when the store has it.
    syncnet = layout.syncnet.relative_to(root).as_posix()
    there = (
        storage.exists(storage.join(cfg.models_dir, syncnet))
        if storage.is_remote(cfg.models_dir)
        else layout.syncnet.exists()
    )
    if sync or there:
        files.append((syncnet, "SyncNet weights (qa.sync; or set qa.sync=false)"))
    return files


def check_remote_weights(cfg: PipelineConfig, *, sync: bool = False) -> None:
    """One WeightsError naming every required file missing below the URI ``models.dir`` (with ``sync``,
    the lip-sync scorer's too)."""
    missing = []
    for rel, what in weight_files(cfg, sync=sync):
        uri = storage.join(cfg.models_dir, rel)
        if not storage.exists(uri):
            missing.append(f"{what} at {uri}")
    if missing:
        hint = ModelLayout.at("DIR", tiny=cfg.tiny).fetch_hint.format(root="DIR")
        raise WeightsError(
            f"missing model weights: {', '.join(missing)}; fetch them with `{hint}` and upload DIR "
            f"to {cfg.models_dir}"
        )


def local_models(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` loading from this node: a URI ``models.dir`` is synced into the node-local staging
    directory first (once per node; later workers find the files there)."""
    if not storage.is_remote(cfg.models_dir):
        return cfg
    dest = storage.staging_root() / "models" / storage.key(cfg.models_dir)
    storage.sync(cfg.models_dir, [rel for rel, _ in weight_files(cfg)], dest)
    return replace(cfg, models_dir=str(dest))
