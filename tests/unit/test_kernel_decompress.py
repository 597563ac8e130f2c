"""luod.kernel.decompress: each standard-library compression, the bound,
and every way a payload can be bad ends in DecompressError."""

from __future__ import annotations

import bz2
import gzip
import lzma

import pytest

from luod.kernel.decompress import DecompressError, decompress

DATA = b"\x7fELF kernel " * 1000

PAYLOADS = {
    "gzip": gzip.compress(DATA),
    "xz": lzma.compress(DATA, format=lzma.FORMAT_XZ),
    "lzma": lzma.compress(DATA, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress(DATA),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_each_compression_decompresses_whole(name: str) -> None:
    assert decompress(PAYLOADS[name], 1 << 20) == (name, DATA)


@pytest.mark.parametrize("name", PAYLOADS)
def test_more_than_the_bound_is_refused(name: str) -> None:
    with pytest.raises(DecompressError, match=f"{name} payload decompresses to more than 100"):
        decompress(PAYLOADS[name], 100)


@pytest.mark.parametrize("name", PAYLOADS)
def test_a_cut_payload_is_refused(name: str) -> None:
    with pytest.raises(DecompressError, match=r"cut short|does not decompress"):
        decompress(PAYLOADS[name][: len(PAYLOADS[name]) // 2], 1 << 20)


@pytest.mark.parametrize("name", PAYLOADS)
def test_a_corrupt_payload_is_refused(name: str) -> None:
    payload = PAYLOADS[name]
    corrupt = payload[:12] + bytes(b ^ 0x55 for b in payload[12:40]) + payload[40:]
    with pytest.raises(DecompressError):
        decompress(corrupt, 1 << 20)


def test_unknown_and_uncompressed() -> None:
    assert decompress(DATA, 10) == ("none", DATA)  # an ELF is taken as it is
    with pytest.raises(DecompressError, match="compression is unknown"):
        decompress(b"MZ\x00\x00nothing", 1 << 20)
