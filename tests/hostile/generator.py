"""A seeded generator of hostile messages for luod's socket.

Every message is bytes as they go on the wire (sd-varlink framing: JSON
objects terminated by NUL), the kinds of fds to send with it, whether root
or uid 65534 sends it, and how it is sent (`Mode`). The same seed gives the
same messages, so a failure names a seed that repeats it.

The methods and their parameters are read from protocol/*.varlink, the IDL
luod serves (tests/test_idl.py keeps the two equal), so a parameter added
to a method is attacked without anyone touching this file.

Calls are built so that none of them can succeed in changing what luod
holds: the parameters not under attack name a session, file or
subscription that does not exist, and root's calls never name the seeded
sessions. So after every category luod must hold exactly what it held
before.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
SERVICE = "org.varlink.service"
# Far above any size or depth luod should accept: sd-varlink's message
# limit is 16 MiB.
OVERSIZED = 17 << 20
SCM_MAX_FD = 253


class Mode(enum.Enum):
    # On the worker's long-lived connection; exactly one reply is read.
    CALL = "call"
    # On a connection of its own: sent, the write side shut, and everything
    # luod answers read until it closes (garbage, oneway, more, upgrade).
    ALONE = "alone"


# Kinds of fd a worker can make (tests/hostile/sender.py makes them).
FD_KINDS = (
    "memfd",
    "pipe-read",
    "pipe-write",
    "socket",
    "regular-file",
    "eventfd",
    "dev-null",
    "directory-opath",
    "file-opath",
    "directory",
    "epoll",
    "pidfd",
    "memfd-opath",
)
REFUSED_FD_KINDS = tuple(k for k in FD_KINDS if k != "memfd")


@dataclasses.dataclass(frozen=True)
class Message:
    category: str
    data: bytes
    mode: Mode = Mode.CALL
    fds: tuple[str, ...] = ()
    root: bool = False
    # Method or a short note, for the report of a failing message.
    what: str = ""


@dataclasses.dataclass(frozen=True)
class Method:
    interface: str
    name: str
    # (parameter, varlink type) in IDL order; "?" marks an optional one.
    parameters: tuple[tuple[str, str], ...]

    @property
    def full(self) -> str:
        return f"{self.interface}.{self.name}"


_METHOD = re.compile(r"^method (\w+)\((.*?)\) ->", re.M)


def read_methods(protocol: Path = PROTOCOL) -> list[Method]:
    """Every method luod serves, with its parameters, from the IDL files;
    and org.varlink.service's two."""
    methods = [
        Method(SERVICE, "GetInfo", ()),
        Method(SERVICE, "GetInterfaceDescription", (("interface", "string"),)),
    ]
    for path in sorted(protocol.glob("*.varlink")):
        interface = path.name.removesuffix(".varlink")
        for name, params in _METHOD.findall(path.read_text()):
            parsed = tuple(
                (p.split(":", 1)[0].strip(), p.split(":", 1)[1].strip())
                for p in params.split(",")
                if p.strip()
            )
            methods.append(Method(interface, name, parsed))
    return methods


# The value of a parameter that is not under attack: well-typed, and naming
# nothing that exists, so the call fails for its attacked parameter or for
# that (and never changes anything).
_VALID_BY_NAME: dict[str, Any] = {
    "session": "hostile-none",
    "name": "hostile-none",
    "subscription": "hostile-none",
    "fileDescriptor": 0,
    "kernel": "/nonexistent/hostile-kernel",
    "initrd": "/nonexistent/hostile-initrd",
    "commandLine": "console=ttyS0",
    "reason": "hostile",
    "interface": "io.luod.Custody",
    "update": 1,
    "phase": "prepare",
    "deadlineSec": 1.0,
    "files": [{"name": "hostile-none", "fileDescriptor": 0}],
}
_VALID_BY_TYPE: dict[str, Any] = {
    "string": "hostile-none",
    "int": 1,
    "float": 1.0,
    "bool": False,
}


def valid_value(parameter: str, vtype: str) -> Any:
    if parameter in _VALID_BY_NAME:
        return _VALID_BY_NAME[parameter]
    return _VALID_BY_TYPE.get(vtype.lstrip("?"), "hostile-none")


# Valid and refused: a call with nothing else to refuse must not create.
_CREATING = frozenset({"CreateSession", "CreateDelegatedSession"})
RESERVED_SESSION = "luod-hostile"


def valid_parameters(method: Method) -> dict[str, Any]:
    params = {
        p: valid_value(p, t)
        for p, t in method.parameters
        if not t.startswith("?") or p in _VALID_BY_NAME or t == "?bool"
    }
    if method.name in _CREATING:
        params["session"] = RESERVED_SESSION
    return params


def takes_fd(method: Method) -> bool:
    return any(p in ("fileDescriptor", "files") for p, _ in method.parameters)


# Values of every JSON type, and the edges of each.
WRONG_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    -(2**31) - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**100,
    0.5,
    -0.0,
    1e308,
    -1e308,
    "",
    "x",
    "0",
    "true",
    [],
    [1],
    ["x"],
    [None],
    {},
    {"a": 1},
    {"name": "x", "fileDescriptor": 0},
    [{"name": 1, "fileDescriptor": "x"}],
    [{}],
    [[[]]],
)

# Numbers at the edges, for every int and float parameter whatever its
# type: Python's json reads NaN and Infinity, and ints of any size.
EDGE_NUMBERS: tuple[Any, ...] = (
    float("nan"),
    float("inf"),
    float("-inf"),
    -1,
    0,
    2**63 - 1,
    2**63,
    2**64 + 1,
    -(2**63) - 1,
    2**1000,
    -(2**1000),
    10**4000,
    1e-320,
    -1e-320,
    1.7976931348623157e308,
)

# Names luod must refuse as session names and as fd names.
HOSTILE_NAMES: tuple[str, ...] = (
    "",
    "\x00",
    "a\x00b",
    "hostile\x00",
    "\ud800",
    "a\ud800",
    "\udfff",
    "\udc80x",
    "\ud800\ud800",
    "\n",
    "a\n",
    "a\r\nb",
    "\t",
    "\x01",
    "\x1b[31m",
    "\x7f",
    "a\x85",
    " ",
    " a",
    "a b",
    "/",
    "../etc",
    "a/b",
    "\u202eevil",
    "\ufeff",
    "caf\u00e9",
    "\U0001f600",
    "a\u0301",
    "\uffff",
    "\U0010ffff",
    "a" * 4096,
    "\ud800" * 4096,
    "\x00" * 4096,
    "\u00e9" * 4096,
    "a" * 65536,
    "%s%n%x",
    "${HOME}",
    "'; DROP TABLE",
    "a;b",
    "*",
)

# Method names that name nothing luod serves.
UNKNOWN_METHODS: tuple[str, ...] = (
    "",
    ".",
    "io",
    "io.luod",
    "io.luod.Custody",
    "io.luod.Custody.",
    "io.luod.Custody.createSession",
    "io.luod.Custody.NoSuchMethod",
    "io.luod.Custody.NoSuchSession",
    "io.luod.Manager.Nothing",
    "io.luod.Manager.GetStatus.x",
    "io.luod.Nothing.GetStatus",
    "io.luod.custody.CreateSession",
    "org.varlink.service.Nothing",
    "org.varlink.service",
    "io.systemd.Manager.KExec",
    "org.example.Foo.Bar",
    "\x00",
    "io.luod.Custody.\x00",
    "io.luod.Custody.Create\x00Session",
    "\ud800.\ud800",
    "io.luod.Custody.\ud800",
    "\u00e9.\u00e9",
    "a" * 4096,
    "io.luod.Custody." + "A" * 4096,
    "a." * 2048,
    "..........",
    " io.luod.Manager.GetStatus",
    "io.luod.Manager.GetStatus ",
    "io.luod.Manager.GetStatus\n",
)


def frame(obj: Any, ascii_only: bool = True) -> bytes:
    """A message as sd-varlink frames it. Lone surrogates go as \\uXXXX
    escapes (valid JSON, which decodes to a str Python cannot encode)."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode() + b"\0"


def call(
    method: str, parameters: Any = None, *, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    msg: dict[str, Any] = {"method": method}
    if parameters is not None:
        msg["parameters"] = parameters
    if extra:
        msg.update(extra)
    return msg


# --- the categories --------------------------------------------------------------


def _random_bytes(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    for i in range(600):
        n = rng.choice((0, 1, 2, 7, 64, 500, 4000, 60000))
        body = rng.randbytes(n)
        if i % 3 == 0:
            body = body.replace(b"\0", b"")  # no terminator at all
        else:
            body += b"\0"
        if i % 5 == 0:
            # Random bytes after a valid prefix.
            body = b'{"method":"io.luod.Manager.GetStatus",' + body
        fds = ("pipe-read",) * rng.choice((0, 0, 1, 10)) if i % 4 == 0 else ()
        yield Message("random-bytes", body, Mode.ALONE, fds, root=i % 7 == 0, what=f"{n} bytes")


def _invalid_utf8(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    bad = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80")
    for i in range(400):
        b = rng.choice(bad)
        where = i % 4
        if where == 0:
            data = b'{"method":"io.luod.Custody.CreateSession","parameters":{"session":"' + b
            data += b'"}}\0'
        elif where == 1:
            data = b'{"method":"io.luod.Manager.Get' + b + b'Status"}\0'
        elif where == 2:
            data = b'{"' + b + b'":1}\0'
        else:
            # A surrogate encoded raw (surrogatepass): not UTF-8 either.
            name = "x\ud800" if i % 8 == 3 else "\udfff"
            data = (
                json.dumps(
                    call("io.luod.Custody.PreserveFd", {"session": name, "name": "n"}),
                    ensure_ascii=False,
                ).encode("utf-8", "surrogatepass")
                + b"\0"
            )
        # The case: fds with a message that is not UTF-8.
        nfds = (0, 1, 50)[i % 3]
        kind = "memfd" if i % 2 else "pipe-read"
        yield Message(
            "invalid-utf8", data, Mode.ALONE, (kind,) * nfds, root=i % 9 == 0, what=repr(b)
        )


def _invalid_json(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    samples = (
        b"{",
        b"}",
        b"{]",
        b'{"method"}',
        b'{"method":}',
        b'{"method":"io.luod.Manager.GetStatus",}',
        b'{"method":"io.luod.Manager.GetStatus" "x":1}',
        b"{'method':'io.luod.Manager.GetStatus'}",
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":NaN}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":Infinity}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":-Infinity}}',
        b'{"method":"io.luod.Manager.GetStatus"}{"method":"x"}',
        b'{"method":"io.luod.Manager.GetStatus"} trailing',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":"\\ud800\\"}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":"\\u12"}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":"\\q"}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":"a\tb"}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":01}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":1e999999}}',
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":' + b"9" * 5000 + b"}}",
        b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":' + b"9" * 50000 + b"}}",
        b"\xef\xbb\xbf{}",
        b"   ",
        b"",
        b"/* */{}",
        b'{"method":"io.luod.Manager.GetStatus","method":"io.luod.Manager.Check"}',
    )
    for i in range(400):
        data = samples[i % len(samples)]
        if i >= len(samples):
            # Cut a valid call short at a random place.
            m = rng.choice(methods)
            whole = json.dumps(call(m.full, valid_parameters(m))).encode()
            data = whole[: rng.randrange(len(whole))]
        fds = ("memfd",) * (i % 4) if i % 5 == 0 else ()
        yield Message(
            "invalid-json", data + b"\0", Mode.ALONE, fds, root=i % 8 == 0, what=repr(data[:60])
        )


def _non_object(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    values: tuple[Any, ...] = (
        None,
        True,
        0,
        -1,
        1.5,
        "io.luod.Manager.GetStatus",
        [],
        [{"method": "io.luod.Manager.GetStatus"}],
        {},
        {"parameters": {}},
        {"method": None},
        {"method": 1},
        {"method": []},
        {"method": {}},
        {"method": "io.luod.Manager.GetStatus", "parameters": None},
        {"method": "io.luod.Manager.GetStatus", "parameters": []},
        {"method": "io.luod.Manager.GetStatus", "parameters": "x"},
        {"method": "io.luod.Manager.GetStatus", "parameters": 1},
        {"method": "io.luod.Custody.CreateSession", "parameters": ["hostile-none"]},
        {"error": "org.varlink.service.InvalidParameter"},
        {"parameters": {}, "continues": True},
        {"method": "io.luod.Manager.GetStatus", "continues": True},
        {"method": "io.luod.Manager.GetStatus", "unknownKey": 1},
    )
    for i in range(300):
        v = values[i % len(values)]
        yield Message(
            "non-object",
            frame(v),
            Mode.ALONE,
            ("pipe-read",) * (i % 3),
            root=i % 6 == 0,
            what=repr(v)[:60],
        )


def _deep_nesting(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    for i in range(60):
        depth = (100, 500, 1000, 5000, 100_000)[i % 5]
        opener, closer = (b"[", b"]") if i % 2 else (b'{"a":', b"}")
        nest = opener * depth + b"1" + closer * depth
        where = i % 3
        if where == 0:
            data = b'{"method":"io.luod.Custody.CreateSession","parameters":{"session":' + nest
            data += b"}}"
        elif where == 1:
            data = b'{"method":"io.luod.Manager.GetStatus","parameters":{"x":' + nest + b"}}"
        else:
            data = nest
        yield Message(
            "deep-nesting",
            data + b"\0",
            Mode.ALONE,
            ("memfd",) * (i % 2),
            root=i % 4 == 0,
            what=f"depth {depth}",
        )


def _oversized(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    # A long string parameter in a complete message, and a message that
    # never ends; each with an fd.
    big = "a" * OVERSIZED
    yield Message(
        "oversized",
        frame(call("io.luod.Custody.CreateSession", {"session": big})),
        Mode.ALONE,
        ("memfd",),
        what="17 MiB call",
    )
    yield Message("oversized", b"{" + b" " * OVERSIZED, Mode.ALONE, ("memfd",), what="17 MiB open")
    yield Message(
        "oversized",
        frame(call("io.luod.Manager.GetStatus", {"x": ["a" * 1000] * 2000})),
        Mode.ALONE,
        root=True,
        what="2 MiB of parameters",
    )


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}


def is_wrong(vtype: str, value: Any) -> bool:
    """Whether `value` is not of the varlink type (lists and objects are
    always tried: their elements are wrong, or they are of the wrong kind)."""
    base = vtype.lstrip("?")
    if value is None:
        return not vtype.startswith("?")
    types = _JSON_TYPES.get(base)
    if types is None:
        return not isinstance(value, str) or base != "Phase"
    if isinstance(value, bool) and bool not in types:
        return True
    return not isinstance(value, types)


def wrong_values(vtype: str) -> list[Any]:
    return [w for w in WRONG_VALUES if is_wrong(vtype, w)]


def _wrong_types(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    count = 0
    for m in methods:
        for p, t in m.parameters:
            for w in wrong_values(t):
                params = valid_parameters(m)
                params[p] = w
                yield _with_fds(m, call(m.full, params), count, "wrong-types", f"{m.name}.{p}")
                count += 1
            if t.lstrip("?") in ("int", "float"):
                for w in EDGE_NUMBERS:
                    params = valid_parameters(m)
                    params[p] = w
                    yield _with_fds(m, call(m.full, params), count, "wrong-types", f"{m.name}.{p}")
                    count += 1
            if t.startswith("?"):
                continue
            # Missing, when required.
            params = valid_parameters(m)
            del params[p]
            yield _with_fds(m, call(m.full, params), count, "wrong-types", f"{m.name}-{p}")
            count += 1
        # Unknown parameters, and the parameters object replaced.
        for extra in ({"hostile": 1}, {"": None}, {"\ud800": 1}, {"x" * 4096: "y"}):
            params = valid_parameters(m) | extra
            yield _with_fds(m, call(m.full, params), count, "wrong-types", f"{m.name}+extra")
            count += 1
    while count < 2500:
        m = rng.choice([m for m in methods if m.parameters])
        params = valid_parameters(m)
        for p, t in m.parameters:
            if rng.random() < 0.5:
                params[p] = rng.choice(wrong_values(t))
        yield _with_fds(m, call(m.full, params), count, "wrong-types", f"{m.name} mixed")
        count += 1


def _with_fds(m: Method, msg: dict[str, Any], i: int, category: str, what: str) -> Message:
    """Root sends one in seven; an fd goes with every call that takes one."""
    fds = ("memfd",) if takes_fd(m) else ()
    return Message(category, frame(msg), Mode.CALL, fds, root=i % 7 == 0, what=what)


def _unknown_methods(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    for i in range(600):
        name = UNKNOWN_METHODS[i % len(UNKNOWN_METHODS)]
        if i >= 2 * len(UNKNOWN_METHODS):
            m = rng.choice(methods)
            name = m.interface + "." + m.name + rng.choice(("X", "_", "2", "s"))
        params = rng.choice(({}, None, {"session": "hostile-none"}))
        fds = ("memfd",) * (i % 3 == 0)
        yield Message(
            "unknown-methods",
            frame(call(name, params)),
            Mode.CALL,
            fds,
            root=i % 5 == 0,
            what=repr(name)[:60],
        )


def _fd_abuse(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    indexes: tuple[Any, ...] = (
        -1,
        -2,
        1,
        2,
        252,
        253,
        254,
        1000,
        2**31 - 1,
        2**31,
        2**63,
        -(2**63),
    )
    fd_methods = [m for m in methods if takes_fd(m)]
    plain = [m for m in methods if not takes_fd(m)]
    count = 0
    for m in fd_methods:
        for idx in indexes:
            for nfds in (0, 1, 3):
                params = valid_parameters(m)
                if "files" in params:
                    params["files"] = [{"name": "hostile-none", "fileDescriptor": idx}]
                else:
                    params["fileDescriptor"] = idx
                yield Message(
                    "fd-abuse",
                    frame(call(m.full, params)),
                    Mode.CALL,
                    ("memfd",) * nfds,
                    root=count % 6 == 0,
                    what=f"{m.name} index {idx} of {nfds}",
                )
                count += 1
    while count < 1500:
        kind = rng.randrange(5)
        if kind == 0:
            # 253 fds (SCM_MAX_FD) with a call that takes one.
            m = rng.choice(fd_methods)
            fds, what = ("memfd",) * SCM_MAX_FD, "253 fds"
            params = valid_parameters(m)
        elif kind == 1:
            # fds with a call that takes none.
            m = rng.choice(plain)
            fds, what = (
                (rng.choice(FD_KINDS),) * rng.choice((1, 2, 10, SCM_MAX_FD)),
                "fds, none taken",
            )
            params = valid_parameters(m)
        elif kind == 2:
            # PreserveFds naming the same index twice, or indexes out of order.
            m = next(m for m in fd_methods if m.name == "PreserveFds")
            n = rng.randrange(1, 20)
            params = valid_parameters(m)
            params["files"] = [
                {"name": f"hostile{j}x\x00", "fileDescriptor": rng.randrange(-2, n + 2)}
                for j in range(n)
            ]
            fds, what = ("memfd",) * rng.randrange(0, n + 1), f"{n} files, shuffled indexes"
        elif kind == 3:
            # Surplus fds with a call that takes one.
            m = rng.choice(fd_methods)
            params = valid_parameters(m)
            fds, what = (rng.choice(FD_KINDS),) * rng.randrange(2, 60), "surplus fds"
        else:
            # The index as another type.
            m = rng.choice(fd_methods)
            params = valid_parameters(m)
            bad = rng.choice((None, "0", 0.0, 0.5, True, [0], {"fd": 0}))
            if "files" in params:
                params["files"] = [{"name": "hostile-none", "fileDescriptor": bad}]
            else:
                params["fileDescriptor"] = bad
            fds, what = ("memfd",), f"index {bad!r}"
        yield Message(
            "fd-abuse",
            frame(call(m.full, params)),
            Mode.CALL,
            fds,
            root=count % 6 == 0,
            what=f"{m.name}: {what}",
        )
        count += 1


def _fd_kinds(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    """Every kind of fd luod must refuse, where a memfd (or a LUO session)
    is expected; with names and sessions that would otherwise be valid, so
    the kind of fd is what is refused. createSession too: refusing the fd
    must not leave a new session behind."""
    fd_methods = [m for m in methods if takes_fd(m)]
    count = 0
    while count < 1000:
        for m in fd_methods:
            for kind in REFUSED_FD_KINDS:
                params = valid_parameters(m)
                session = f"hostile-k{count % 5}"
                if "session" in params:
                    params["session"] = session
                if "name" in params:
                    params["name"] = "f"
                if "files" in params:
                    params["files"] = [{"name": "f", "fileDescriptor": 0}]
                if "createSession" in params:
                    params["createSession"] = True
                yield Message(
                    "fd-kinds",
                    frame(call(m.full, params)),
                    Mode.CALL,
                    (kind,),
                    root=count % 5 == 0,
                    what=f"{m.name} with {kind}",
                )
                count += 1


def _names(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    string_params = [
        (m, p) for m in methods for p, t in m.parameters if t.lstrip("?") in ("string", "Phase")
    ]
    preserve_fds = next((m for m in methods if m.name == "PreserveFds"), None)
    count = 0
    while count < 2000:
        for m, p in string_params:
            name = HOSTILE_NAMES[count % len(HOSTILE_NAMES)]
            params = valid_parameters(m)
            params[p] = name
            if "createSession" in params:
                params["createSession"] = True
            root = count % 4 == 0 or (m.name == "LoadKernel" and count % 2 == 0)
            yield Message(
                "names",
                frame(call(m.full, params)),
                Mode.CALL,
                ("memfd",) if takes_fd(m) else (),
                root=root,
                what=f"{m.name}.{p}={name[:20]!r}",
            )
            count += 1
        if preserve_fds is not None:
            name = rng.choice(HOSTILE_NAMES)
            params = valid_parameters(preserve_fds) | {"createSession": True}
            params["files"] = [
                {"name": "ok", "fileDescriptor": 0},
                {"name": name, "fileDescriptor": 1},
            ]
            yield Message(
                "names",
                frame(call(preserve_fds.full, params)),
                Mode.CALL,
                ("memfd", "memfd"),
                root=count % 3 == 0,
                what=f"PreserveFds files[1].name={name[:20]!r}",
            )
            count += 1


def _flags(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    """`more`, `oneway` and `upgrade` where they do not belong, combined,
    and of the wrong type."""
    flag_sets: tuple[dict[str, Any], ...] = (
        {"more": True},
        {"oneway": True},
        {"upgrade": True},
        {"more": True, "oneway": True},
        {"more": True, "upgrade": True},
        {"oneway": True, "upgrade": True},
        {"more": True, "oneway": True, "upgrade": True},
        {"more": 1},
        {"oneway": "yes"},
        {"upgrade": None},
        {"more": False, "oneway": False, "upgrade": False},
        {"more": [True]},
        {"continues": True},
    )
    count = 0
    while count < 1000:
        for m in methods:
            flags = flag_sets[count % len(flag_sets)]
            params = valid_parameters(m)
            if "session" in params:
                params["session"] = RESERVED_SESSION
            if m.name == "Subscribe" and count % 2:
                # A valid subscription name: the call may be served.
                params = {"name": f"hostile-sub{count}"}
            yield Message(
                "flags",
                frame(call(m.full, params, extra=flags)),
                Mode.ALONE,
                ("memfd",) if takes_fd(m) else (),
                root=count % 5 == 0,
                what=f"{m.name} {flags}",
            )
            count += 1


def _pipelined(rng: random.Random, methods: list[Method]) -> Iterator[Message]:
    """Many calls in one write, mixed valid and invalid, on one connection."""
    for i in range(200):
        parts = []
        for _ in range(rng.randrange(2, 40)):
            m = rng.choice(methods)
            params = valid_parameters(m)
            if rng.random() < 0.5 and m.parameters:
                p, t = rng.choice(m.parameters)
                hostile = list(HOSTILE_NAMES) if t.lstrip("?") == "string" else []
                params[p] = rng.choice(wrong_values(t) + hostile)
            parts.append(frame(call(m.full, params)))
        if i % 4 == 0:
            parts.append(b"\xff\xfe garbage\0")
        yield Message(
            "pipelined",
            b"".join(parts),
            Mode.ALONE,
            ("memfd",) * (i % 3),
            root=i % 5 == 0,
            what=f"{len(parts)} calls",
        )


CATEGORIES: dict[str, Callable[[random.Random, list[Method]], Iterator[Message]]] = {
    "wrong-types": _wrong_types,
    "unknown-methods": _unknown_methods,
    "names": _names,
    "fd-abuse": _fd_abuse,
    "fd-kinds": _fd_kinds,
    "flags": _flags,
    "pipelined": _pipelined,
    "random-bytes": _random_bytes,
    "invalid-utf8": _invalid_utf8,
    "invalid-json": _invalid_json,
    "non-object": _non_object,
    "deep-nesting": _deep_nesting,
    "oversized": _oversized,
}
# Malformed on the wire: the transport's to refuse (closing the connection).
TRANSPORT_CATEGORIES = frozenset(
    {"random-bytes", "invalid-utf8", "invalid-json", "non-object", "deep-nesting", "oversized"}
)


def generate(seed: int, category: str, methods: list[Method] | None = None) -> list[Message]:
    """The messages of one category, the same for the same seed."""
    rng = random.Random(f"{seed}:{category}")
    return list(CATEGORIES[category](rng, methods if methods is not None else read_methods()))
