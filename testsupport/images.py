"""Synthetic kernel images for the next-kernel preflight: bzImages whose
payload is compressed as the kernel's CONFIG_KERNEL_* would, and UKIs.

A synthetic "vmlinux" holds what luod.kernel.image looks for and nothing
else: the LUO ABI string as a string literal, the memfd handler's string
after a pointer, the "Linux version" banner and, optionally, an embedded
config (CONFIG_IKCONFIG). The bzImage has a real boot protocol header
(setup sectors, version pointer, payload offset and length, the decompressed
size appended to the payload as the kernel's size_append does). Nothing of
it boots; the fake kernel never boots what it loads.
"""

from __future__ import annotations

import bz2
import gzip
import importlib
import lzma
import struct
from collections.abc import Mapping
from pathlib import Path

from luod.kernel.image import RunningLuo
from testsupport.fakekernel import FAKE_LUO_ABI, FAKE_MEMFD_ABI

VERSION = "7.3.4-luod-test (luod@luod-vm) #1 SMP PREEMPT"
# A running kernel as the project's 7.3 kernel reports its LUO (debugfs):
# what a next kernel, synthetic or the project's own build, must speak.
RUNNING_LUO = RunningLuo("luo-v5", {"memfd": "memfd-v2"}, "the test")
# What the fake kernel needs on a next kernel's command line.
GOOD_CMDLINE = "console=ttyS0 kho=on liveupdate=on"


def vmlinux(
    luo_abi: str | None = FAKE_LUO_ABI,
    memfd: str | None = FAKE_MEMFD_ABI,
    config: Mapping[str, str] | None = None,
    version: str = VERSION,
) -> bytes:
    parts = [b"\x7fELF" + b"\0" * 60, b"some text\0"]
    if luo_abi is not None:
        parts += [b"LUO state is too small (%zu < %zu)\n\0", luo_abi.encode() + b"\0"]
    if memfd is not None:
        parts += [b"\0" * 8 + b"\xc0\xf5\x62\x81\xff\xff\xff\xff", memfd.encode() + b"\0" * 40]
    parts.append(f"Linux version {version} (gcc 12.2.0)\n\0".encode())
    if config is not None:
        text = "".join(f"CONFIG_{k}={v}\n" for k, v in config.items()).encode()
        parts.append(b"IKCFG_ST" + gzip.compress(text) + b"IKCFG_ED")
    return b"".join(parts) + b"\0" * 4096


def compress(name: str, data: bytes) -> bytes:
    """As the kernel's Makefile.lib does it, with the size appended."""
    size = struct.pack("<I", len(data))
    if name == "gzip":
        # No timestamp, as `gzip -n` (and one test id on every xdist worker).
        return gzip.compress(data, mtime=0) + size
    if name == "xz":
        return lzma.compress(data, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
    if name == "lzma":
        return lzma.compress(data, lzma.FORMAT_ALONE) + size
    if name == "bzip2":
        return bz2.compress(data) + size
    if name == "zstd":
        zstandard = importlib.import_module("zstandard")
        return bytes(zstandard.ZstdCompressor().compress(data)) + size
    if name == "lz4":  # the legacy frame: magic, then [le32 size][block]...
        block = importlib.import_module("lz4.block")
        out = [b"\x02\x21\x4c\x18"]
        for i in range(0, len(data), 8 << 20):
            c = block.compress(data[i : i + (8 << 20)], store_size=False)
            out += [struct.pack("<I", len(c)), c]
        return b"".join(out) + size
    if name == "none":
        return data
    raise ValueError(name)


def bzimage_bytes(payload: bytes, version: str | None = VERSION) -> bytes:
    """A bzImage around `payload` (already compressed)."""
    setup_sects = 3
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    if version is not None:
        raw = version.encode() + b"\0"
        head[0x600 : 0x600 + len(raw)] = raw
        struct.pack_into("<H", head, 0x20E, 0x600 - 0x200)
    offset = 0x40  # from the start of the protected-mode code
    struct.pack_into("<II", head, 0x248, offset, len(payload))
    return bytes(head) + b"\0" * offset + payload + b"\0" * 64


def bzimage(
    path: Path,
    compression: str = "xz",
    *,
    luo_abi: str | None = FAKE_LUO_ABI,
    memfd: str | None = FAKE_MEMFD_ABI,
    config: Mapping[str, str] | None = None,
    version: str = VERSION,
) -> Path:
    """Write a bzImage of a synthetic kernel to `path`."""
    inner = vmlinux(luo_abi, memfd, config, version)
    path.write_bytes(bzimage_bytes(compress(compression, inner), version))
    return path


def uki_bytes(
    linux: bytes,
    initrd: bytes | None = None,
    cmdline: str | None = None,
    uname: str | None = None,
) -> bytes:
    """A PE file as ukify makes it: a stub (here: no code) and sections."""
    sections = [(".text", b"\xc3" * 16)]
    if cmdline is not None:
        sections.append((".cmdline", cmdline.encode() + b"\0"))
    if uname is not None:
        sections.append((".uname", uname.encode()))
    if initrd is not None:
        sections.append((".initrd", initrd))
    sections.append((".linux", linux))
    pe, opt_size = 0x80, 0xF0
    table = pe + 24 + opt_size
    start = (table + 40 * len(sections) + 511) & ~511
    head = bytearray(start)
    head[0:2] = b"MZ"
    struct.pack_into("<I", head, 0x3C, pe)
    head[pe : pe + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", head, pe + 4, 0x8664, len(sections), 0, 0, 0, opt_size, 0x22)
    struct.pack_into("<H", head, pe + 24, 0x20B)  # PE32+
    body = bytearray()
    for i, (name, data) in enumerate(sections):
        raw = len(data) + (-len(data) % 512)
        struct.pack_into(
            "<8sIIII",
            head,
            table + 40 * i,
            name.encode(),
            len(data),
            0x1000 * (i + 1) << 8,
            raw,
            start + len(body),
        )
        body += data + b"\0" * (raw - len(data))
    return bytes(head) + bytes(body)


def uki(
    path: Path,
    linux: bytes | None = None,
    initrd: bytes | None = None,
    cmdline: str | None = GOOD_CMDLINE,
    uname: str | None = "7.3.4-luod-test",
) -> Path:
    if linux is None:
        linux = bzimage_bytes(compress("xz", vmlinux()))
    path.write_bytes(uki_bytes(linux, initrd, cmdline, uname))
    return path


def fake_bzimage(path: Path) -> Path:
    """A file luod's image check takes for an x86 bzImage that can take the
    fake kernel's handover: the fake kernel needs a 'loaded kernel' before a
    kexec, but never boots it. Load it with a command line that has kho=on
    liveupdate=on (GOOD_CMDLINE)."""
    return bzimage(path)
