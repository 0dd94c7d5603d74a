"""Object storage through fsspec: URIs in (``s3://``, ``gs://``, ``file://``, ...), node-local paths out.

Inputs are *staged*: downloaded once per node into ``<staging root>/inputs/<key>/<name>``, the key
hashing the URI and the object's identity (ETag, size, mtime), so a later job on the same object reuses
the file and a changed object gets a new one. A download goes to a temporary name and is renamed when
whole, so no half-written file is ever used. Outputs are rendered locally and *published*: one upload
per file, which object stores make visible whole or not at all (an S3 PUT or completed multipart upload,
a finalised GCS upload); a local target is written under a temporary name and renamed.

The staging root is ``$MUSETALK_STAGING_DIR``, else ``~/.cache/musetalk-farm/staging``. Credentials and
endpoints come from each provider's usual environment and config files (``AWS_*``, ``~/.aws``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...). Plain paths and ``file://`` URIs are local: never copied.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from shards.errors import StorageError

logger = logging.getLogger(__name__)

STAGING_ENV = "MUSETALK_STAGING_DIR"
# A scheme of two or more characters: ``C://x`` or ``C:\x`` is a Windows drive, not a URI.
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# The fsspec implementation each common protocol needs, for the "install ..." hint.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
_PROVIDER_MODULES = {
    "botocore",
    "aiobotocore",
    "s3fs",
    "gcsfs",
    "google",
    "adlfs",
    "azure",
    "aiohttp",
    "fsspec",
}


def staging_root() -> Path:
    """The node-local directory for staged inputs, synced weights and outputs before they are published."""
    env = os.environ.get(STAGING_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "musetalk-farm" / "staging"


def protocol(s: str) -> str | None:
    """The URI scheme of ``s`` (lower case), or None for a plain path."""
    m = _URI.match(s)
    return m[1].lower() if m else None


def is_uri(s: str) -> bool:
    """Whether ``s`` is a URI (``file://`` included), not a plain or Windows path."""
    return protocol(s) is not None


def is_remote(s: str) -> bool:
    """Whether ``s`` names something that is not on this machine's file system (a non-``file://`` URI)."""
    return protocol(s) not in (None, "file", "local")


def local_path(s: str) -> Path | None:
    """The local path ``s`` names (a plain path or a ``file://`` URI); None for any other URI."""
    if not is_uri(s):
        return Path(s)
    if protocol(s) in ("file", "local"):
        return Path(_URI.sub("", s, count=1) or "/")
    return None


def beside(uri: str, suffix: str) -> str:
    """``uri`` with its extension replaced: ``s3://b/x/out.mp4`` -> ``s3://b/x/out.summary.json``."""
    head, _, name = uri.rpartition("/")
    return f"{head}/{PurePosixPath(name).with_suffix(suffix)}"


def join(root: str, relative: str) -> str:
    """``relative`` (POSIX) below the URI ``root``."""
    return f"{root.rstrip('/')}/{relative}"


def key(*parts: str) -> str:
    """A short stable directory name for ``parts``."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


@contextlib.contextmanager
def errors(uri: str, action: str) -> Iterator[None]:
    """Turn fsspec and provider exceptions into one-line StorageErrors that name ``uri`` and the fix."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as err:
        raise StorageError(
            f"{uri} not found ({_first_line(err) or 'no such object'}); check the URI"
        ) from None
    except PermissionError as err:
        raise StorageError(
            f"access to {uri} denied while {action} ({_first_line(err)}); check the credentials' permissions"
        ) from None
    except Exception as err:
        if type(err).__name__ in _CREDENTIAL_ERRORS:
            raise StorageError(
                f"no credentials for {uri} while {action}; set the provider's usual environment "
                "(e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) or config file (~/.aws/credentials)"
            ) from None
        # I/O errors and the providers' own classes become one line; anything else is a bug: raised.
        if isinstance(err, OSError) or type(err).__module__.split(".")[0] in _PROVIDER_MODULES:
            raise StorageError(f"{action} {uri} failed: {type(err).__name__}: {_first_line(err)}") from None
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def open_fs(uri: str):
    """(filesystem, path inside it) for ``uri``; a StorageError names the package a protocol needs."""
    name = protocol(uri)
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise StorageError(f"{uri} needs fsspec; pip install fsspec") from None
    if name is not None and name not in fsspec.available_protocols():
        raise StorageError(
            f"unknown storage protocol {name}:// in {uri}; use s3://, gs://, file:// or a path"
        )
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError:
        package = _PACKAGES.get(name or "")
        fix = f"pip install {package}" if package else f"install the fsspec implementation for {name}://"
        raise StorageError(f"{uri} needs a package that is not installed; {fix}") from None
    except ValueError as err:
        raise StorageError(f"cannot open {uri}: {_first_line(err)}") from None


def info(uri: str) -> dict:
    """fsspec's ``info`` for ``uri`` (StorageError when it is missing or unreadable)."""
    fs, path = open_fs(uri)
    with errors(uri, "reading"):
        return fs.info(path)


def identity(meta: dict) -> str:
    """What changes when an object's contents change: ETag (or checksum), size and modification time."""
    tag = meta.get("ETag") or meta.get("etag") or meta.get("md5Hash") or meta.get("crc32c") or ""
    mtime = meta.get("LastModified") or meta.get("mtime") or meta.get("updated") or meta.get("created") or ""
    return f"{tag}:{meta.get('size')}:{mtime}"


def cat(uri: str) -> bytes:
    """The bytes of one object. The provider's own errors are raised as they are: a unit that cannot read
    an object it was given is retried like any unexpected failure."""
    fs, path = open_fs(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    """Whether the object or file ``uri`` exists (StorageError for credentials, protocol, ...)."""
    fs, path = open_fs(uri)
    with errors(uri, "reading"):
        return fs.exists(path)


def bucket_problem(uri: str) -> str | None:
    """For an object-store URI, the problem when its bucket (the first path part) does not exist."""
    if not is_remote(uri):
        return None
    fs, path = open_fs(uri)
    bucket = path.strip("/").split("/")[0]
    with errors(uri, "checking its bucket"):
        if fs.exists(bucket):
            return None
    return f"the bucket {protocol(uri)}://{bucket} of {uri} does not exist; create it or choose another URI"


def stage(uri: str, root: Path | None = None) -> Path:
    """A local file holding ``uri``: a plain path or ``file://`` as is, else a download into this node's
    staging directory (``root``, default ``<staging root>/inputs``), reused while the object is unchanged."""
    local = local_path(uri)
    if local is not None:
        return local
    fs, path = open_fs(uri)
    with errors(uri, "reading"):
        meta = fs.info(path)
    if meta.get("type") == "directory":
        raise StorageError(f"{uri} is a directory; give a file")
    dest = (root or staging_root() / "inputs") / key(uri, identity(meta)) / PurePosixPath(path).name
    if dest.is_file() and dest.stat().st_size == meta.get("size", dest.stat().st_size):
        logger.info("%s already staged at %s", uri, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _download(fs, path, uri, dest, meta.get("size"))
    logger.info("staged %s at %s", uri, dest)
    return dest


def _download(fs, path: str, uri: str, dest: Path, size: int | None) -> None:
    """``path`` into ``dest`` through a temporary name in the same directory: ``dest`` is whole or absent."""
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with errors(uri, "downloading"):
            fs.get_file(path, str(partial))
        got = partial.stat().st_size
        if size is not None and got != size:
            raise StorageError(f"downloading {uri} gave {got} bytes, expected {size}; run again")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def publish(local: Path, uri: str) -> None:
    """Upload the finished file ``local`` to ``uri`` so that it appears whole or not at all."""
    target = local_path(uri)
    if target is not None:
        if target.exists() and os.path.samefile(local, target):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            shutil.copyfile(local, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return
    fs, path = open_fs(uri)
    with errors(uri, "uploading to"):
        fs.put_file(str(local), path)  # one PUT (or multipart upload): visible only once complete
    logger.info("published %s", uri)


def sync(root: str, relative: Iterable[str], dest: Path) -> Path:
    """Copy the files ``relative`` (POSIX paths below the URI ``root``) into ``dest`` once per node.

    Holds ``dest/.lock`` (``flock``) so concurrent workers on a node download once; a file already there
    with the object's size is skipped; each download is renamed into place when whole. Returns ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    fs, base = open_fs(root)
    fd = os.open(dest / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        fetched = 0
        for rel in relative:
            uri = join(root, rel)
            with errors(uri, "reading"):
                meta = fs.info(join(base, rel))
            target = dest / rel
            if target.is_file() and target.stat().st_size == meta.get("size"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(fs, join(base, rel), uri, target, meta.get("size"))
            fetched += 1
        logger.info("weights from %s in %s (%d files fetched)", root, dest, fetched)
    finally:
        os.close(fd)
    return dest
