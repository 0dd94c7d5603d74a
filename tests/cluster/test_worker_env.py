"""The environment a pool's workers start with (cluster.session.worker_env): no Ray needed."""

import os

from cluster.faults import HOLD_ENV
from cluster.session import CUBLAS_WORKSPACE, MALLOC_ARENAS, worker_env


def _clear(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + [HOLD_ENV, "CUBLAS_WORKSPACE_CONFIG"]:
        monkeypatch.delenv(key, raising=False)


def test_workers_get_few_malloc_arenas_by_default(monkeypatch):
    _clear(monkeypatch)
    assert worker_env() == {
        "MALLOC_ARENA_MAX": str(MALLOC_ARENAS),
        "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE,
    }


def test_the_drivers_malloc_settings_and_hold_point_travel_and_win(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    monkeypatch.setenv(HOLD_ENV, str(tmp_path))
    monkeypatch.setenv("UNRELATED", "x")
    assert worker_env() == {
        "MALLOC_ARENA_MAX": "8",
        "MALLOC_MMAP_THRESHOLD_": "4194304",
        "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE,
        HOLD_ENV: str(tmp_path),
    }


def test_the_drivers_cublas_workspace_config_wins(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert worker_env()["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
