"""Atomic file output: write to a temporary name beside the target, then rename.

An interrupted write (Ctrl-C, kill -9, full disk) never leaves a half-written file under the final
name, and an existing file is replaced only by a complete new one. PNG masks are encoded here too:
8-bit palette PNGs with zlib directly, because OpenCV cannot write indexed PNGs.
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from allspark_cli.errors import DataError, WriteError
from allspark_cli.labels import full_palette


_DEFAULT_FILE_MODE = 0o666
TEMP_MARKER = ".tmp"  # in every temporary name: .<target name>.<random>.tmp<target suffix>


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_error(target: str | os.PathLike, error: OSError) -> WriteError:
    """The one-line report of a failed write: the final path, the cause, and that nothing was replaced."""
    cause = error.strerror or str(error) or type(error).__name__
    return WriteError(f"could not write {target}: {cause}; any earlier version of it is unchanged")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; renames it onto `path` if the block succeeds.

    The temporary name keeps the suffix so that libraries choosing a format by suffix still work.
    An OSError while writing (disk full, permission lost, read-only file system) becomes WriteError
    naming `path`; the target keeps its previous content. `durable` flushes the file to the disk
    before the rename (checkpoints: a power cut then leaves the old or the new file, never a hole),
    which costs a sync per file, too much for thousands of masks.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f"{TEMP_MARKER}{target.suffix}", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, _DEFAULT_FILE_MODE & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as error:
        raise write_error(target, error) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # e.g. the folder's permission was lost as well
                tmp.unlink(missing_ok=True)


def remove_stale_temps(folder: str | os.PathLike, name_pattern: str = "*", *, recursive: bool = False) -> int:
    """Deletes the temporary files of `atomic_path` for targets matching `name_pattern` that a killed
    process left in `folder` (in subfolders too with `recursive`; never any other file). Returns how
    many were removed; a file that cannot be removed is a WriteError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    pattern = f".{name_pattern}.*{TEMP_MARKER}*"
    for path in folder.rglob(pattern) if recursive else folder.glob(pattern):
        if path.is_file():
            try:
                path.unlink()
            except OSError as error:
                raise write_error(path, error) from None
            removed += 1
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_palette_png(mask: np.ndarray, colors: np.ndarray | list) -> bytes:
    """8-bit indexed PNG bytes of a (H, W) uint8 mask with the given class colours."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"palette PNGs take a (H, W) uint8 mask, got {mask.shape} {mask.dtype}")
    height, width = mask.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 (indexed)
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), mask], axis=1)  # filter byte 0 per row
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", full_palette(colors).tobytes()),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def encode_png(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """PNG bytes of a uint8 array: (H, W) single channel, or (H, W, 3) RGB.

    With `palette` ((<=256, 3) uint8 RGB) a (H, W) index array is written as an 8-bit palette PNG,
    the format of VOC's SegmentationClass masks: viewers show colours, readers get class ids.
    """
    import cv2

    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {array.dtype}")
    if palette is not None:
        return encode_palette_png(array, palette)
    data = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", data)
    if not ok:
        raise DataError(f"could not encode a PNG of shape {array.shape}")
    return buffer.tobytes()


def write_png(path: str | os.PathLike, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Atomically writes `array` as PNG (see `encode_png`)."""
    atomic_write_bytes(path, encode_png(array, palette))
