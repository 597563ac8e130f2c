#!/usr/bin/python3
"""A guest small enough for QEMU under TCG inside a TCG VM: one boot sector.

    tinyguest.py image FILE          write the 512-byte boot sector
    tinyguest.py check FILE          FILE (a pmemsave of the pattern region)
                                     holds exactly the pattern; exit 1 if not
    tinyguest.py layout              the addresses below, as JSON

SeaBIOS loads the sector at 0x7C00 and jumps to it in real mode. It:
1. sets its stack (0x6000, below the code's page), zeroes the counter at
   COUNTER and writes MAGIC at COUNTER+4: a guest that booted again would
   start counting from 0;
2. fills PATTERN_START..PATTERN_END (448 KiB) with dwords SEED + i * STEP
   and sets COUNTER+8 to 1 when done;
3. loops `sti; hlt; inc dword [COUNTER]; jmp`: one tick per interrupt (the
   BIOS timer, ~18.2 per second), idle in between.

The counter lives in another 4 KiB page than the code: TCG invalidates the
translated code of a page that is written to, which slows a loop whose data
shares its page by ~60 times.

No assembler needed: the bytes are below, each with its instruction.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys

COUNTER = 0x9000  # u32, +1 per interrupt
MAGIC_AT = COUNTER + 4
PATTERN_DONE_AT = COUNTER + 8
MAGIC = 0x444F554C  # "LUOD" in memory order
PATTERN_START = 0x10000
PATTERN_END = 0x80000
SEED = 0x4C554F44
STEP = 0x9E3779B9
STACK = 0x6000
SECTOR = 512


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def boot_sector() -> bytes:
    """The 512 bytes: code, zero padding, the 0x55 0xAA signature."""
    code = bytearray()
    labels: dict[str, int] = {}
    fixups: list[tuple[int, str]] = []  # offset of a rel8 byte, target label

    def emit(*parts: bytes) -> None:
        for p in parts:
            code.extend(p)

    def label(name: str) -> None:
        labels[name] = len(code)

    def jump(opcode: int, target: str) -> None:
        code.append(opcode)
        fixups.append((len(code), target))
        code.append(0)

    emit(b"\xfa")  # cli
    emit(b"\xfc")  # cld
    emit(b"\x31\xc0")  # xor ax, ax
    emit(b"\x8e\xd8")  # mov ds, ax
    emit(b"\x8e\xd0")  # mov ss, ax
    emit(b"\xbc", _u16(STACK))  # mov sp, STACK
    emit(b"\x66\xc7\x06", _u16(COUNTER), _u32(0))  # mov dword [COUNTER], 0
    emit(b"\x66\xc7\x06", _u16(MAGIC_AT), _u32(MAGIC))  # mov dword [MAGIC_AT], MAGIC
    emit(b"\x66\xc7\x06", _u16(PATTERN_DONE_AT), _u32(0))  # mov dword [DONE], 0
    emit(b"\x66\xb8", _u32(SEED))  # mov eax, SEED
    emit(b"\xbb", _u16(PATTERN_START >> 4))  # mov bx, segment of PATTERN_START
    label("segment")
    emit(b"\x8e\xc3")  # mov es, bx
    emit(b"\x31\xff")  # xor di, di
    label("fill")
    emit(b"\x66\xab")  # stosd: [es:di] = eax, di += 4
    emit(b"\x66\x05", _u32(STEP))  # add eax, STEP
    emit(b"\x85\xff")  # test di, di (0 again: the 64 KiB segment is full)
    jump(0x75, "fill")  # jnz fill
    emit(b"\x81\xc3", _u16(0x1000))  # add bx, 0x1000 (the next 64 KiB)
    emit(b"\x81\xfb", _u16(PATTERN_END >> 4))  # cmp bx, segment of PATTERN_END
    jump(0x72, "segment")  # jb segment
    emit(b"\x66\xc7\x06", _u16(PATTERN_DONE_AT), _u32(1))  # mov dword [DONE], 1
    label("tick")
    emit(b"\xfb")  # sti
    emit(b"\xf4")  # hlt (until the next interrupt)
    emit(b"\x66\xff\x06", _u16(COUNTER))  # inc dword [COUNTER]
    jump(0xEB, "tick")  # jmp tick

    for at, target in fixups:
        rel = labels[target] - (at + 1)
        assert -128 <= rel < 128, (target, rel)
        code[at] = rel & 0xFF
    assert len(code) <= SECTOR - 2, len(code)
    return bytes(code) + bytes(SECTOR - 2 - len(code)) + b"\x55\xaa"


def pattern() -> bytes:
    """What the guest writes to PATTERN_START..PATTERN_END."""
    count = (PATTERN_END - PATTERN_START) // 4
    return b"".join(_u32(SEED + i * STEP) for i in range(count))


def pattern_sha256() -> str:
    return hashlib.sha256(pattern()).hexdigest()


def layout() -> dict[str, int | str]:
    return {
        "counter": COUNTER,
        "magic_at": MAGIC_AT,
        "magic": MAGIC,
        "pattern_done_at": PATTERN_DONE_AT,
        "pattern_start": PATTERN_START,
        "pattern_end": PATTERN_END,
        "pattern_sha256": pattern_sha256(),
        "code_bytes": len(boot_sector().rstrip(b"\0\x55\xaa")),
    }


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "image":
        with open(argv[1], "wb") as f:
            f.write(boot_sector())
        return 0
    if len(argv) == 2 and argv[0] == "check":
        with open(argv[1], "rb") as f:
            got = f.read()
        ok = got == pattern()
        print(json.dumps({"ok": ok, "bytes": len(got), "sha256": hashlib.sha256(got).hexdigest()}))
        return 0 if ok else 1
    if argv == ["layout"]:
        print(json.dumps(layout(), indent=1))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
