"""Reading a kernel image: what the next kernel is, and whether it can take
the handover.

A kernel can read what the previous one handed over only when it speaks the
same LUO ABI (`LUO_ABI_COMPATIBLE` in include/linux/kho/abi/luo.h, "luo-v5"
in 7.3) and has a file handler with the same compatible string for every
kind of file carried (memfd's `MEMFD_LUO_FH_COMPATIBLE`, "memfd-v2" in
7.3). Both are C string literals in the kernel's rodata/data, so they are
found in the decompressed image:

- an x86 bzImage: the boot protocol header ("HdrS" at 0x202) says where the
  compressed payload is (payload_offset/payload_length, protocol >= 2.08)
  and points at the version string; the payload is gzip, xz, lzma, bzip2,
  zstd or lz4 (the kernel's CONFIG_KERNEL_*; luod.kernel.decompress).
- a UKI: a PE file with a `.linux` section (the bzImage), `.initrd` and
  `.cmdline`, split as `systemctl kexec` does.
- an embedded config (CONFIG_IKCONFIG: gzip between "IKCFG_ST" and
  "IKCFG_ED") says whether KHO is on without `kho=on`
  (CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT) and whether LUO is built in.

The running kernel's values come from `running_luo()`; see there. Raises
only ImageError (with a sentence) for what cannot be read.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping

from luod.kernel import decompress as kernel_decompress
from luod.record import record

# Decompressed kernels are tens of MiB; a payload that says more is refused
# rather than read into luod's memory.
MAX_VMLINUX = 512 << 20
MAX_IMAGE = 1 << 30

# /sys/kernel/debug/kho/out/sub_fdts/LUO is the running kernel's outgoing
# LUO state (struct luo_ser), exactly as it will be handed over: its first
# field is the LUO ABI compatible string (CONFIG_KEXEC_HANDOVER_DEBUGFS,
# debugfs mounted, root).
DEBUGFS_LUO = "/sys/kernel/debug/kho/out/sub_fdts/LUO"
LUO_ABI_COMPAT_MAX = 48
PROC_VERSION = "/proc/version"
PROC_CMDLINE = "/proc/cmdline"

# What luod knows of released kernels, by "major.minor" of the release, for
# what the running kernel exposes nowhere at run time (the file handlers'
# compatible strings; the LUO ABI when debugfs is not mounted). From each
# series' include/linux/kho/abi/{luo,memfd}.h.
KNOWN: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "7.3": ("luo-v5", {"memfd": "memfd-v2"}),
}

# The file handlers luod needs: it carries memfds only (its own manifest too).
HANDLERS = ("memfd",)

_LUO_ABI = re.compile(rb"\x00(luo-v[0-9]+[!-~]{0,40})\x00")
# A handler's compatible string is a char array inside its struct, after a
# pointer: no NUL before it, but no printable byte either.
_HANDLER = {"memfd": re.compile(rb"(?<![!-~])(memfd-v[0-9]+[!-~]{0,38})\x00")}
_BANNER = re.compile(rb"Linux version ([!-~]+)")


class ImageError(Exception):
    """The image cannot be read as a kernel; str() says why."""


@record(frozen=True)
class KernelFacts:
    """What a kernel image says about itself and its LUO."""

    # The setup header's version string ("7.3.4 (user@host) #1 SMP ...").
    version: str | None
    compression: str
    # LUO ABI compatible strings found: () means no LUO in this kernel.
    luo_abi: tuple[str, ...]
    # Handler name -> compatible strings found ("memfd" -> ("memfd-v2",)).
    handlers: Mapping[str, tuple[str, ...]]
    # The embedded .config, None without CONFIG_IKCONFIG.
    config: Mapping[str, str] | None

    @property
    def release(self) -> str | None:
        return None if not self.version else self.version.split()[0]

    def option(self, name: str) -> bool | None:
        """CONFIG_<name>=y per the embedded config; None without one."""
        if self.config is None:
            return None
        return self.config.get(name) == "y"


@record(frozen=True)
class Uki:
    """The parts of a unified kernel image that kexec needs."""

    linux: bytes
    initrd: bytes | None
    cmdline: str | None
    uname: str | None


@record(frozen=True)
class RunningLuo:
    """The running kernel's LUO ABI and file handlers, and where from."""

    luo_abi: str | None
    handlers: Mapping[str, str]
    # Where each came from, for the log and the refusal.
    source: str


# -------------------------------------------------------------- command line


def parse_cmdline(cmdline: str) -> dict[str, str | None]:
    """The kernel's parameters as its parse_args() sees them: words split
    on spaces outside double quotes, the last of a name wins, nothing after
    a lone "--" (that goes to init). A bare word has the value None."""
    params: dict[str, str | None] = {}
    for word in _words(cmdline):
        if word == "--":
            break
        name, eq, value = word.partition("=")
        params[name.replace('"', "").replace("_", "-")] = value.replace('"', "") if eq else None
    return params


def _words(s: str) -> Iterator[str]:
    word: list[str] = []
    quoted = False
    for ch in s:
        if ch == '"':
            quoted = not quoted
            word.append(ch)
        elif ch.isspace() and not quoted:
            if word:
                yield "".join(word)
                word = []
        else:
            word.append(ch)
    if word:
        yield "".join(word)


def kstrtobool(value: str | None) -> bool | None:
    """The kernel's kstrtobool(): None when it would refuse the value."""
    if not value:
        return None
    c = value[0].lower()
    if c in "eyt1":
        return True
    if c in "dnf0":
        return False
    if c == "o" and len(value) > 1:
        return {"n": True, "f": False}.get(value[1].lower())
    return None


def cmdline_problems(cmdline: str, facts: KernelFacts | None) -> list[str]:
    """What the command line lacks for the next kernel to read the
    handover (kernel/liveupdate/kexec_handover.c's `kho=`, luo_core.c's
    `liveupdate=`, both early params read with kstrtobool)."""
    params = parse_cmdline(cmdline)
    problems = []
    # A value kstrtobool refuses leaves the built-in default, as no kho= does.
    kho = kstrtobool(params.get("kho"))
    if kho is False:
        problems.append(f"its command line turns KHO off (kho={params['kho']}): use kho=on")
    elif kho is None:
        default = None if facts is None else facts.option("KEXEC_HANDOVER_ENABLE_DEFAULT")
        if default is not True:
            why = (
                "the image is not built with CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT"
                if default is False
                else "the image has no embedded config to say it is built with CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT"
            )
            problems.append(f"its command line lacks kho=on ({why})")
    if kstrtobool(params.get("liveupdate")) is not True:
        value = params.get("liveupdate")
        have = (
            ""
            if "liveupdate" not in params
            else " (a bare liveupdate does nothing)"
            if value is None
            else f" (it has liveupdate={value})"
        )
        problems.append(f"its command line lacks liveupdate=on{have}")
    return problems


# ------------------------------------------------------------------- images


def read_file(path: str | int) -> bytes:
    """The whole file (a path or an fd), bounded."""
    try:
        fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open it: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_IMAGE:
            raise ImageError(f"it is {size} bytes, more than a kernel image ({MAX_IMAGE})")
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 22, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ImageError(f"cannot read it: {e.strerror}") from None
    finally:
        if not isinstance(path, int):
            os.close(fd)


def split_uki(data: bytes) -> Uki | None:
    """The sections of a UKI (a PE file with .linux), None for any other
    file; ImageError for a PE file whose section table is broken."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        return None
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if data[pe : pe + 4] != b"PE\0\0":
        return None
    try:
        count, _, _, _, opt_size = struct.unpack_from("<HIIIH", data, pe + 6)
        table = pe + 24 + opt_size
        sections: dict[str, bytes] = {}
        for i in range(count):
            raw = struct.unpack_from("<8sIIII", data, table + 40 * i)
            name = raw[0].rstrip(b"\0").decode("ascii", "replace")
            vsize, _, rsize, rptr = raw[1:5]
            # Raw data is padded to the file alignment; the virtual size
            # is the section's own (what ukify and systemd use).
            size = min(vsize, rsize) if vsize else rsize
            if rptr + size > len(data):
                raise ImageError(f"its PE section {name} reaches past the end of the file")
            sections.setdefault(name, data[rptr : rptr + size])
    except struct.error:
        raise ImageError("its PE section table is cut short") from None
    if ".linux" not in sections:
        return None

    def text(name: str) -> str | None:
        s = sections.get(name)
        return None if s is None else s.rstrip(b"\0").decode(errors="replace").strip() or None

    return Uki(
        linux=sections[".linux"],
        initrd=sections.get(".initrd"),
        cmdline=text(".cmdline"),
        uname=text(".uname"),
    )


def read_bzimage(data: bytes) -> KernelFacts:
    """The facts of an x86 bzImage (decompressing its payload)."""
    if data[0x202:0x206] != b"HdrS":
        raise ImageError("not an x86 bzImage (no boot protocol header 'HdrS' at 0x202)")
    (proto,) = struct.unpack_from("<H", data, 0x206)
    if proto < 0x208:
        raise ImageError(f"its boot protocol {proto >> 8}.{proto & 0xFF:02d} is older than 2.08")
    setup = ((data[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", data, 0x248)
    payload = data[setup + offset : setup + offset + length]
    if len(payload) != length or not length:
        raise ImageError("its payload reaches past the end of the file")
    (vptr,) = struct.unpack_from("<H", data, 0x20E)
    version = None
    if vptr:
        raw = data[vptr + 0x200 : vptr + 0x200 + 256].split(b"\0")[0]
        version = raw.decode(errors="replace").strip() or None
    compression, vmlinux = decompress(payload)
    return scan(vmlinux, version, compression)


def scan(vmlinux: bytes, version: str | None, compression: str) -> KernelFacts:
    """Find the LUO strings, the banner and the embedded config."""
    if version is None and (m := _BANNER.search(vmlinux)):
        version = m.group(1).decode(errors="replace")
    return KernelFacts(
        version=version,
        compression=compression,
        luo_abi=_found(_LUO_ABI, vmlinux),
        handlers={h: _found(_HANDLER[h], vmlinux) for h in HANDLERS},
        config=ikconfig(vmlinux),
    )


def _found(pattern: re.Pattern[bytes], data: bytes) -> tuple[str, ...]:
    return tuple(sorted({m.group(1).decode() for m in pattern.finditer(data)}))


def ikconfig(vmlinux: bytes) -> dict[str, str] | None:
    """CONFIG_IKCONFIG's gzip'd .config, as {name without CONFIG_: value}."""
    start = vmlinux.find(b"IKCFG_ST")
    if start < 0:
        return None
    end = vmlinux.find(b"IKCFG_ED", start)
    try:
        text = gzip.decompress(vmlinux[start + 8 : end if end > 0 else None])
    except (OSError, EOFError, zlib.error):
        return None
    config = {}
    for line in text.decode(errors="replace").splitlines():
        name, eq, value = line.partition("=")
        if eq and name.startswith("CONFIG_"):
            config[name[7:]] = value
    return config


def decompress(payload: bytes) -> tuple[str, bytes]:
    """(compression, the decompressed kernel), bounded by MAX_VMLINUX."""
    try:
        return kernel_decompress.decompress(payload, MAX_VMLINUX)
    except kernel_decompress.DecompressError as e:
        raise ImageError(str(e)) from None


# --------------------------------------------------------- the running kernel


def running_luo(
    debugfs: str = DEBUGFS_LUO,
    proc_version: str = PROC_VERSION,
    images: Callable[[str], list[str]] | None = None,
) -> RunningLuo:
    """The running kernel's LUO ABI and file handlers.

    1. The LUO ABI from debugfs (DEBUGFS_LUO): the very state this kernel
       hands over. 2. The running kernel's own image, when one is found
       (/boot/vmlinuz-RELEASE, BOOT_IMAGE= of /proc/cmdline) whose version
       is the one in /proc/version: its file handlers (and its LUO ABI
       without debugfs). 3. luod's own table (KNOWN) by release series for
       what is still missing: no running kernel exposes its file handlers'
       compatible strings."""
    abi, sources = None, []
    try:
        with open(debugfs, "rb") as f:
            raw = f.read(LUO_ABI_COMPAT_MAX).split(b"\0")[0]
        if raw:
            abi = raw.decode(errors="replace")
            sources.append(f"LUO ABI from {debugfs}")
    except OSError:
        pass
    try:
        with open(proc_version) as f:
            banner = f.read().strip()
    except OSError:
        banner = ""
    release = banner.split()[2] if banner.startswith("Linux version ") else os.uname().release
    handlers: dict[str, str] = {}
    for path in (images or _own_images)(release):
        try:
            facts = read_bzimage(read_file(path))
        except (ImageError, OSError):
            continue
        if not facts.version or not banner.startswith(f"Linux version {facts.release} "):
            continue
        if abi is None and len(facts.luo_abi) == 1:
            abi = facts.luo_abi[0]
            sources.append(f"LUO ABI from {path}")
        handlers = {h: v[0] for h, v in facts.handlers.items() if len(v) == 1}
        if handlers:
            sources.append(f"file handlers from {path}")
        break
    series = ".".join(release.split(".")[:2])
    known = KNOWN.get(series)
    if known is not None:
        if abi is None:
            abi = known[0]
            sources.append(f"LUO ABI from luod's table for {series}")
        if not handlers:
            handlers = dict(known[1])
            sources.append(f"file handlers from luod's table for {series}")
    return RunningLuo(
        luo_abi=abi,
        handlers=handlers,
        source="; ".join(sources) or f"nothing known of {release}",
    )


def _own_images(release: str) -> list[str]:
    """Where the running kernel's image may be."""
    found = [f"/boot/vmlinuz-{release}", f"/usr/lib/modules/{release}/vmlinuz"]
    try:
        with open(PROC_CMDLINE) as f:
            boot = parse_cmdline(f.read()).get("BOOT-IMAGE")
    except OSError:
        boot = None
    if boot:
        # GRUB says it as seen from the boot partition: /vmlinuz-... may be /boot/...
        found[:0] = [boot, "/boot" + boot]
    return [p for p in found if os.path.isfile(p)]


def handover_problems(facts: KernelFacts, running: RunningLuo) -> list[str]:
    """Why the next kernel cannot read what the running one hands over."""
    problems = []
    if not facts.luo_abi:
        why = (
            " (its config has no CONFIG_LIVEUPDATE)"
            if facts.option("LIVEUPDATE") is False
            else " (built without CONFIG_LIVEUPDATE?)"
        )
        problems.append(f"the image has no LUO{why}: it would find nothing")
    elif running.luo_abi is None:
        problems.append(
            f"cannot tell which LUO ABI the running kernel writes ({running.source}; mount debugfs "
            f"for {DEBUGFS_LUO}); the image speaks {', '.join(facts.luo_abi)}"
        )
    elif running.luo_abi not in facts.luo_abi:
        problems.append(
            f"the image speaks LUO ABI {', '.join(facts.luo_abi)}, the running kernel writes "
            f"{running.luo_abi} ({running.source}): it would refuse everything handed over"
        )
    if facts.luo_abi:
        for h in HANDLERS:
            found, have = facts.handlers.get(h, ()), running.handlers.get(h)
            if not found:
                problems.append(
                    f"the image has no {h} file handler (CONFIG_LIVEUPDATE_{h.upper()}): "
                    f"every {h} would be lost"
                )
            elif have is None:
                problems.append(
                    f"cannot tell the running kernel's {h} file handler ({running.source}); "
                    f"the image has {', '.join(found)}"
                )
            elif have not in found:
                problems.append(
                    f"the image's {h} file handler is {', '.join(found)}, the running kernel's is "
                    f"{have}: every {h} would be lost"
                )
    return problems
