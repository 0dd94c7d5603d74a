"""Errors found on a worker, through the real CLI: one ``error:`` line, no traceback, no traces.

Unlike ``test_cli_errors.py`` these cases pass every check before Ray: the weights exist, so the render
starts Ray and its workers, whose models fail to load. The worker's traceback must not reach the
terminal (Ray forwards workers' output there): it goes to the run's log file. Nothing may be left beside
the output (no run directory, no lock), no worker scratch and no process of the run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from musetalk.layout import ModelLayout
from tests.helpers import cli, cli_tmp, error_lines, processes_under, scratch_under, wait_for


class _Payload:
    """A pickled object where tensors belong (``torch.load(weights_only=True)`` refuses it)."""

    def __init__(self) -> None:
        self.payload = "arbitrary code would run here"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickled_payload(path: Path) -> None:
    torch.save({"conv_in.weight": _Payload()}, path)


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], None]
    needle: str
    code: int = 3  # WeightsError


CASES = [
    Case("truncated_unet", _truncate, "not a readable torch checkpoint"),
    Case("pickled_payload_unet", _pickled_payload, "not a readable torch checkpoint"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_broken_weights_fail_with_one_line_and_leave_nothing(
    case, tiny_models, demo_media, short_audio, tmp_path
):
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    unet = ModelLayout.at(models, tiny=True).unet_weights
    case.damage(unet)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hydra_dir = tmp_path / "hydra"
    tmp = cli_tmp()
    proc = cli(
        "+task=test",
        "models=tiny",
        f"models.dir={models}",
        f"task.video={demo_media.video}",
        f"task.audio={short_audio}",
        f"task.output={out_dir / 'out.mp4'}",
        f"hydra.run.dir={hydra_dir}",
        "cluster.workers=1",
        tmp=tmp,
    )
    assert proc.returncode == case.code, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert case.needle in errors[0] and str(unet) in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    # the worker's traceback is kept in the run's log file (the frame that raised is named there)
    assert "in load_torch_state" in (hydra_dir / "render.log").read_text()
    assert list(out_dir.iterdir()) == []  # no output, no .out.mp4.run/, no lock
    assert scratch_under(tmp) == []
    assert wait_for(lambda: not processes_under(tmp))
