"""Decompressing a kernel's payload, as the kernel's own compressors write it.

gzip, xz, lzma and bzip2 come from the standard library; zstd and lz4 need
the `zstandard` / `lz4` packages, imported only when such a payload comes
and named (with the Debian package) when missing. Every decompressor stops
past a caller's bound, so an image that claims more is refused, not read
into luod's memory. Raises only DecompressError, with a sentence that
follows "the kernel image: ".
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Protocol


class DecompressError(Exception):
    pass


class _Stream(Protocol):
    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def _to_the_end(
    stream: Callable[[], _Stream], errors: tuple[type[Exception], ...]
) -> Callable[[bytes, int], bytes]:
    """A decompressor that reads its whole stream, or at most `bound` + 1
    bytes of output: more than a kernel can be is refused by the caller."""

    def run(data: bytes, bound: int) -> bytes:
        d = stream()
        try:
            out = d.decompress(data, bound + 1)
        except errors as e:
            raise DecompressError(f"its payload does not decompress: {e}") from None
        if not d.eof and len(out) <= bound:
            raise DecompressError("its payload is cut short (it does not decompress to its end)")
        return out

    return run


def _module(name: str, what: str) -> object:
    package = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DecompressError(
            f"its payload is {what}-compressed and the Python package {package!r} "
            f"that reads it is not installed (pip install {package}, or Debian's "
            f"python3-{package})"
        ) from None


def _zstd(data: bytes, bound: int) -> bytes:
    zstandard: object = _module("zstandard", "zstd")
    d = zstandard.ZstdDecompressor().decompressobj()  # type: ignore[attr-defined]
    try:
        out: bytes = d.decompress(data)
    except Exception as e:  # zstandard.ZstdError
        raise DecompressError(f"its payload does not decompress: {e}") from None
    return out


def _lz4(data: bytes, bound: int) -> bytes:
    """The kernel's lz4 is the legacy frame format (lz4 -l): a magic, then
    blocks of [le32 compressed size][data], each at most 8 MiB decompressed."""
    block: object = _module("lz4.block", "lz4")
    out, pos = [], 4
    total = 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == 0x184C2102:  # a new frame's magic: go on
            pos += 4
            continue
        chunk = data[pos + 4 : pos + 4 + size]
        if len(chunk) < size:
            break  # the trailing le32 of the decompressed size
        try:
            piece: bytes = block.decompress(chunk, uncompressed_size=8 << 20)  # type: ignore[attr-defined]
        except Exception as e:  # lz4.block.LZ4BlockError
            raise DecompressError(f"its payload does not decompress: {e}") from None
        out.append(piece)
        total += len(piece)
        if total > bound:
            break
        pos += 4 + size
    return b"".join(out)


# Magic -> (name, decompressor), as the kernel's compressors write them.
COMPRESSIONS: tuple[tuple[bytes, str, Callable[[bytes, int], bytes]], ...] = (
    (
        b"\x1f\x8b",
        "gzip",
        _to_the_end(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), (zlib.error,)),
    ),
    (
        b"\xfd7zXZ\x00",
        "xz",
        _to_the_end(lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), (lzma.LZMAError,)),
    ),
    (
        b"\x5d\x00\x00",
        "lzma",
        _to_the_end(lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE), (lzma.LZMAError,)),
    ),
    (b"BZh", "bzip2", _to_the_end(bz2.BZ2Decompressor, (OSError,))),
    (b"\x28\xb5\x2f\xfd", "zstd", _zstd),
    (b"\x02\x21\x4c\x18", "lz4", _lz4),
)


def decompress(payload: bytes, bound: int) -> tuple[str, bytes]:
    """(compression, the decompressed kernel) of at most `bound` bytes. An
    uncompressed ELF payload (CONFIG_KERNEL_UNCOMPRESSED) is taken as it is."""
    if payload[:4] == b"\x7fELF":
        return "none", payload
    for magic, name, run in COMPRESSIONS:
        if payload.startswith(magic):
            out = run(payload, bound)
            if len(out) > bound:
                raise DecompressError(f"its {name} payload decompresses to more than {bound} bytes")
            if not out:
                raise DecompressError(f"its {name} payload decompresses to nothing")
            return name, out
    raise DecompressError(f"its payload's compression is unknown (it starts {payload[:6].hex()})")
