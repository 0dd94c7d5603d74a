"""Write constraints.txt: the exact version of every package this project pulls in, from a working venv.

``make constraints`` runs it (``.venv/bin/python deploy/freeze_constraints.py > constraints.txt``). It walks
the requirements of ``musetalk-farm[dev]`` (read from this checkout's pyproject.toml, then from the
installed packages' metadata; plus gfpgan, installed with ``--no-deps``) and pins
what it finds, so packages someone installed by hand never leak in. torch, torchvision, triton and the
``nvidia-*`` CUDA libraries are left out: the CPU venv that writes this file would otherwise force its CPU
torch onto GPU nodes, which pin torch themselves (``TORCH_SPEC``, ``deploy/Dockerfile``,
``deploy/cluster.yaml``).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS = ("dev",)
EXTRA_ROOTS = ["gfpgan"]  # installed with --no-deps: pinned, its own requirements are not followed
UNPINNED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    """canonical name -> installed version of every requirement reachable from the project."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    roots = project["dependencies"] + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    found: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(r.name, set(r.extras)) for r in map(Requirement, roots)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonical(name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker matched nothing installed (optional on this platform)
        found[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    for name in EXTRA_ROOTS:
        found[canonical(name)] = metadata.version(name)
    return found


def main() -> None:
    print("# Exact versions for every machine that runs musetalk-farm (driver, Ray nodes, images).")
    print("# Install with: pip install -c constraints.txt -e '.[dev]' (the Makefile does).")
    print("# Regenerate from a working venv: make constraints")
    print("# (deploy/freeze_constraints.py; torch, triton and nvidia-* are pinned where they are installed).")
    print(
        f"# Written with Python {sys.version_info.major}.{sys.version_info.minor}: Ray needs it everywhere."
    )
    for name, version in sorted(closure().items()):
        if not UNPINNED.match(name):
            print(f"{name}=={version}")


if __name__ == "__main__":
    main()
