"""Download planning (pure), file checks, and the URL executor against a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from musetalk.download import (
    GROUPS,
    Download,
    all_downloads,
    check_file,
    download,
    fetch,
    hash_prefix,
    plan_downloads,
)
from musetalk.layout import ModelLayout
from shards.errors import ConfigError, WeightsError


def _sized(path: Path, size: int) -> None:
    """A sparse file of exactly ``size`` bytes (cheap even for the 3.4 GB UNet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


def test_empty_dir_plans_every_layout_file(tmp_path: Path) -> None:
    layout = ModelLayout.at(tmp_path)
    plan = plan_downloads(layout)
    dests = {d.dest for d in plan}
    for path in (
        layout.unet_config,
        layout.unet_weights,
        layout.vae_dir / "config.json",
        layout.vae_dir / "diffusion_pytorch_model.safetensors",
        layout.whisper_dir / "config.json",
        layout.whisper_dir / "model.safetensors",
        layout.whisper_dir / "preprocessor_config.json",
        layout.face_parse,
        layout.resnet18,
        layout.s3fd,
        layout.fan,
        layout.gfpgan,
        layout.syncnet,
    ):
        assert path in dests, path
    assert len(plan) == len(dests) == 13
    assert {d.group for d in plan} == set(GROUPS)
    by_dest = {d.dest: d for d in plan}
    assert by_dest[layout.unet_weights].origin == "hf://TMElyralab/MuseTalk/musetalkV15/unet.pth"
    assert (
        by_dest[layout.s3fd].origin == "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"
    )
    assert by_dest[layout.fan].sha256 == "11f355bf06"
    assert by_dest[layout.resnet18].sha256.startswith("5c106cde")
    assert by_dest[layout.vae_dir / "diffusion_pytorch_model.safetensors"].fallback.source.endswith(".bin")


def test_present_files_are_skipped_and_wrong_sizes_refetched(tmp_path: Path) -> None:
    layout = ModelLayout.at(tmp_path)
    for item in all_downloads(layout):
        _sized(item.dest, item.size or 10)
    assert plan_downloads(layout) == []

    _sized(layout.unet_weights, 1000)  # a truncated UNet
    (layout.vae_dir / "diffusion_pytorch_model.safetensors").unlink()
    _sized(layout.vae_dir / "diffusion_pytorch_model.bin", 334_707_217)  # the .bin alternative counts
    layout.s3fd.unlink()
    assert [d.dest for d in plan_downloads(layout)] == [layout.unet_weights, layout.s3fd]


def test_only_filter(tmp_path: Path) -> None:
    layout = ModelLayout.at(tmp_path)
    plan = plan_downloads(layout, only=["vae", "face_alignment"])
    assert [d.dest.name for d in plan] == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        layout.s3fd.name,
        layout.fan.name,
    ]
    with pytest.raises(ConfigError, match="unknown model group.*sd-vae.*choose from unet, vae"):
        plan_downloads(layout, only=["vae", "sd-vae"])


def test_hash_prefix_from_names() -> None:
    assert hash_prefix("s3fd-619a316812.pth") == "619a316812"
    assert hash_prefix("2DFAN4-11f355bf06.pth.tar") == "11f355bf06"
    assert hash_prefix("resnet18-5c106cde.pth") == "5c106cde"
    assert hash_prefix("GFPGANv1.4.pth") is None
    assert hash_prefix("79999_iter.pth") is None


def test_check_file_verifies_size_and_hash_prefix(tmp_path: Path) -> None:
    content = b"weights" * 1000
    digest = hashlib.sha256(content).hexdigest()
    path = tmp_path / f"model-{digest[:10]}.pth"
    path.write_bytes(content)
    prefix = hash_prefix(path.name)
    assert check_file(path, len(content), prefix) is None
    assert check_file(path, None, digest) is None
    assert "bytes, expected" in check_file(path, len(content) + 1, prefix)
    path.write_bytes(content[:-1] + b"X")
    assert f"expected {prefix}..." in check_file(path, None, prefix)
    assert "does not exist" in check_file(tmp_path / "nope.pth", None, None)


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.files`` with single-range support, like a CDN."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        body = self.server.files.get(self.path)
        self.server.ranges.append(self.headers.get("Range"))
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(body) and start > 0:
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    httpd.files, httpd.ranges = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url_item(server, tmp_path: Path, body: bytes, name: str, size: int | None, sha: str | None) -> Download:
    server.files[f"/{name}"] = body
    return Download(
        "test",
        tmp_path / "out" / name,
        f"http://127.0.0.1:{server.server_port}/{name}",
        size=size,
        sha256=sha,
    )


def test_url_fetch_resumes_a_partial_file_and_verifies(server, tmp_path: Path) -> None:
    body = bytes(range(256)) * 4000
    name = f"net-{hashlib.sha256(body).hexdigest()[:10]}.pth"
    item = _url_item(server, tmp_path, body, name, len(body), hash_prefix(name))
    part = item.dest.with_name(item.dest.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:300_000])

    fetch(item, tmp_path / "staging")

    assert item.dest.read_bytes() == body and not part.exists()
    assert server.ranges == ["bytes=300000-"]

    part.write_bytes(body)  # a complete .part left behind: the server answers 416, the file is still placed
    item.dest.unlink()
    fetch(item, tmp_path / "staging")
    assert item.dest.read_bytes() == body


def test_url_fetch_rejects_corrupt_data_and_reports_http_errors(server, tmp_path: Path) -> None:
    body = b"not the real weights" * 100
    item = _url_item(server, tmp_path, body, "s3fd-619a316812.pth", None, "619a316812")
    with pytest.raises(WeightsError, match="is corrupt .*sha256"):
        fetch(item, tmp_path / "staging")
    assert not item.dest.exists() and not item.dest.with_name(item.dest.name + ".part").exists()

    missing = Download("test", tmp_path / "x.pth", f"http://127.0.0.1:{server.server_port}/gone.pth")
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch(missing, tmp_path / "staging")


def test_download_fetches_what_it_can_then_reports_the_failures(
    server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One failed file does not stop the others; the error counts them and names the directory."""
    body = b"weights" * 100
    good = _url_item(server, tmp_path, body, "good.pth", len(body), None)
    gone = Download("test", tmp_path / "out" / "gone.pth", f"http://127.0.0.1:{server.server_port}/gone.pth")
    layout = ModelLayout.at(tmp_path / "out")
    monkeypatch.setattr("musetalk.download.all_downloads", lambda _layout: [gone, good])

    assert download(layout, dry_run=True) == [gone, good] and not good.dest.exists()
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(
            WeightsError, match=f"^1 of 2 downloads into {layout.root} failed; run the same command again"
        ),
    ):
        download(layout)
    assert good.dest.read_bytes() == body and not gone.dest.exists()
    assert [r.getMessage() for r in caplog.records if "HTTP 404" in r.getMessage()] != []
    assert plan_downloads(layout) == [gone]  # a second run fetches only the failed file
