"""Writing results without ever leaving a half-written one: temp name, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def check_lora_path(path: Path) -> Path:
    """A LoRA file's path, refused before anything is read: missing, or not a .safetensors file
    (pickled .pt/.bin files are never loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickled .pt/.bin files are never loaded)")
    return path


def check_writable(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing result unless `force` is set."""
    if Path(path).exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force (force=True) to overwrite it, or choose another --out")


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temp path beside `path`; on success rename it into place, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
