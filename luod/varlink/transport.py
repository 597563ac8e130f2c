"""Everything that reaches into asyncvarlink's internals, and the per-call context.

luod serves with asyncvarlink but needs what it does not offer: the peer's
credentials on each call, a listen backlog for a burst of clients at boot,
received fds with FD_CLOEXEC, noticing fds the kernel dropped (luod at its
open-file limit), a `more` call (a subscription) that does not stop the
connection from being read, and the bounds of luod.varlink.limits. luod
reads and frames messages itself (LuodTransport): linearly, up to the
maximum message size, with the fds of each message closed at once when the
message is refused. It also serves a call as soon as it is read and sends
its reply at once (asyncvarlink waits an iteration of the loop for each,
and registers a writer per reply), serves a plain call (a method and its
parameters, one reply) in one step without asyncvarlink's per-call objects
(its fds as plain ints, its reply said by luod.varlink.replyconv), and keeps
fds where asyncvarlink looks at them without an exception per fd (issue 12:
per-call and per-fd cost).
Each is done here by overriding or reading asyncvarlink's private parts;
this is the one module to check when asyncvarlink changes (pyproject.toml
pins the versions the tests cover).

fds travel as sd-varlink does it: an int in the JSON is an index into the
SCM_RIGHTS array of the message. luod resolves indexes itself (`take_fd`,
rather than typing them as asyncvarlink FileDescriptor) so that a bad index
is a named error with its parameter, and so that every received fd is
accounted for: taken into custody (which keeps or closes it) or closed with
the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import functools
import inspect
import os
import resource
import socket
import struct
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from asyncvarlink import (
    AnnotatedResult,
    FileDescriptor,
    FileDescriptorArray,
    TypedVarlinkErrorReply,
    VarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodCall,
    VarlinkMethodReply,
    VarlinkMethodSignature,
    VarlinkTransport,
    VarlinkUnixServer,
    varlinkmethod,
    varlinksignature,
)
from asyncvarlink.conversion import (
    ConversionError,
    FileDescriptorVarlinkType,
    OOBTypeState,
    SimpleVarlinkType,
    VarlinkType,
)
from asyncvarlink.serviceerrors import InvalidParameter
from asyncvarlink.types import JSONObject, validate_interface, validate_name

from luod import errors
from luod.log import get_logger, serving_uid_from
from luod.peer import Peer, peer_of_socket
from luod.record import record
from luod.scmrights import ANCBUF_SIZE, fds_in
from luod.varlink import limits as lim
from luod.varlink.limits import (
    MAX_PENDING_CALLS,
    MAX_QUEUED_REPLY,
    MAX_QUEUED_REPLY_FDS,
    ConnectionCounts,
    Limits,
    ProtocolViolation,
    Transit,
    decode_message,
)
from luod.varlink.replyconv import ReplyConverter, reply_converter

log = get_logger()

# asyncvarlink's FileDescriptorArray needs a first referee to be released.
_SENTINEL = object()

# --- per-call context: who called, and the fds that came with the call -------


# The fds that came with a call. A call asyncvarlink serves has them in its
# FileDescriptorArray; a plain call served as soon as it is read
# (LuodProtocol.frame_received) has the received ints themselves, -1 once
# taken or closed: no FileDescriptor object, reference count and __del__ per
# fd of a hand-off (issue 12, goal 4).
CallFds = FileDescriptorArray | list[int]

# Told whether a reply that hands fds over went out (on_delivery): True
# once its fds did, False if they never will.
Settle = Callable[[bool], None]


def close_left(fds: CallFds) -> None:
    """Close the fds of a call that nothing took."""
    if isinstance(fds, list):
        for i, fd in enumerate(fds):
            if fd >= 0:
                fds[i] = -1
                with contextlib.suppress(OSError):
                    os.close(fd)
        return
    for entry in fds:
        if entry.fd is not None:
            entry.close()


@record
class CallContext:
    """The call being served: who made it, and the fds that came with it."""

    peer: Peer
    fds: CallFds | None
    protocol: LuodProtocol
    # The kernel dropped fds of this call: luod was at its open-file limit.
    fds_dropped: bool = False
    taken: set[int] = dataclasses.field(default_factory=set)
    # Called once it is known whether the call's reply was delivered
    # (on_delivery); the transport's to call once the reply is handed to
    # it (handed_over).
    settle: Settle | None = None

    def handed_over(self) -> Settle | None:
        """What to call once the reply is delivered or not, for the
        transport the reply is now handed to."""
        settle, self.settle = self.settle, None
        return settle

    def not_replied(self) -> None:
        """The call failed before its reply was handed to the transport
        (its error goes out instead): what it handed over comes back."""
        settle = self.handed_over()
        if settle is not None:
            settle(False)

    def close_untaken(self) -> None:
        """Close the fds of the call that nothing took, before its reply goes
        out: a client that has its answer finds them closed, as when replies
        waited for the loop (they would be closed with the call's array
        anyway, a moment later)."""
        if self.fds is None:
            return
        if isinstance(self.fds, list):
            close_left(self.fds)
            return
        for i, fd in enumerate(self.fds):
            if fd.fd is not None and i not in self.taken:
                fd.close()


_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar("luod_call")


def current() -> CallContext:
    """The call being served (inside an interface method only)."""
    return _current.get()


def _serving_uid() -> int | None:
    """The uid of the caller whose call is being served (an asynchronous
    method's task has the call's context too); None outside a call."""
    ctx = _current.get(None)
    return None if ctx is None else ctx.peer.uid


# luod's lines say whose call caused them (luod.log.CallerBudget).
serving_uid_from(_serving_uid)


def take_fd(index: int, parameter: str) -> int:
    """Take ownership of fd `index` of the current call, or MissingFd
    (TooManyOpenFiles when the kernel dropped fds of the call). Only while
    the method is called: the fds it did not take are closed once it
    returns, or once an asynchronous one is started (LuodProtocol)."""
    ctx = current()
    fds = ctx.fds
    count = 0 if fds is None else len(fds)
    if 0 <= index < count:
        if isinstance(fds, list):
            raw = fds[index]
            if raw >= 0:
                fds[index] = -1
                return raw
        elif fds is not None and index not in ctx.taken:
            entry = fds[index]
            # What FileDescriptor.take() does, for an fd received as an int
            # (as received_fds() makes them), without `if not fd` and take()
            # looking at it through an AttributeError each.
            held = entry.fd
            if isinstance(held, int) and held >= 0:
                ctx.taken.add(index)
                entry.fd = None
                return held
    elif ctx.fds_dropped and index >= count:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        raise errors.TooManyOpenFiles(parameter, index, limit)
    raise errors.MissingFd(parameter, index)


def received_fds(fds: list[int]) -> FileDescriptorArray:
    """The fds of a received message, owned by the array until taken: what
    FileDescriptorArray(referee, fds) makes, without its per-fd look for a
    fileno() method (an AttributeError caught per int). The kernel hands
    out each fd of a message once: no duplicates to refuse."""
    array = FileDescriptorArray(_SENTINEL)
    array._by_position = [FileDescriptor(fd, should_close=True) for fd in fds]
    array._by_fileno = {fd: i for i, fd in enumerate(fds)}
    return array


class _Owned:
    """An fd of luod's that a reply hands over (closed once sent). asyncvarlink
    looks for a fileno() and a close() method on what a FileDescriptor wraps:
    a plain int costs a caught AttributeError each time, three per fd of a
    reply."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def take(self) -> int:
        """The fd, no longer the reply's to close; -1 once closed."""
        fd, self.fd = self.fd, -1
        return fd


def reply_fd(fd: int) -> FileDescriptor:
    """`fd` (owned by the caller until now) for a reply: asyncvarlink
    closes it once the reply is sent."""
    return FileDescriptor(_Owned(fd), should_close=True)


def on_delivery(
    fds: Sequence[FileDescriptor],
    give_back: Callable[[list[int]], None],
    delivered: Callable[[], None],
) -> None:
    """Once the current call's reply with `fds` (made by reply_fd, in the
    reply) is delivered, call `delivered`; should it not be (the connection
    closed, or was closed for its caps, before its fds went out), call
    `give_back` with them instead, the fds then its own to keep or close
    (-1 for one closed already). One of the two is called, once. The fds
    go with the first bytes of the reply the socket takes: from then on
    the reply is delivered (LuodTransport.expect_delivery), whether or not
    the client reads it, which luod cannot know."""
    owned: list[_Owned] = []
    for fd in fds:
        assert type(fd.fd) is _Owned, "made by reply_fd()"
        owned.append(fd.fd)

    def settle(went_out: bool) -> None:
        if went_out:
            delivered()
        else:
            give_back([o.take() for o in owned])

    current().settle = settle


def is_reply_fd(fd: Any) -> bool:
    """Whether `fd` is a FileDescriptor a reply can carry as it is: wrapping
    an int or what reply_fd() wraps."""
    return type(fd) is FileDescriptor and (type(fd.fd) is _Owned or isinstance(fd.fd, int))


# --- an interface's errors, declared once asyncvarlink has made it ----------

_Interface = TypeVar("_Interface", bound=type[VarlinkInterface])


def declaring_errors(
    replies: Sequence[type[TypedVarlinkErrorReply]],
) -> Callable[[_Interface], _Interface]:
    """A class decorator: the interface's `errors` are `replies`, set once
    the class is made. asyncvarlink reads `errors` when a subclass is made,
    into the map by which a client proxy decodes error replies (a server
    never reads it), and when it renders the IDL. Set afterwards, a sequence
    made when first read (luod.varlink.replies.Replies) is first read when
    the IDL is asked for, not at luod's start."""

    def declare(interface: _Interface) -> _Interface:
        interface.errors = replies
        return interface

    return declare


_Method = TypeVar("_Method", bound=Callable[..., Any])


def lazy_varlinkmethod(
    *,
    return_parameter: str | None = None,
    delay_generator: bool = True,
    adjust: Callable[[VarlinkMethodSignature], None] | None = None,
) -> Callable[[_Method], _Method]:
    """asyncvarlink's varlinkmethod, applied when the method is first looked
    up (a call of it, the IDL's rendering) rather than when its interface
    class is made. varlinkmethod inspects the signature and builds the
    conversion of every parameter and of the reply, 1 M instructions a
    method; luod serves 19, and a boot calls a few (issue 12, goal 2:
    luod's start). `adjust` is given the signature once it is built
    (luod.varlink.custody's quicker conversions)."""

    def defer(function: _Method) -> _Method:
        return cast(_Method, _LazyMethod(function, return_parameter, delay_generator, adjust))

    return defer


class _LazyMethod:
    """A method of a VarlinkInterface until it is first looked up, on the
    class or an instance: then varlinkmethod's wrapper takes its place in
    the class. Every lookup asyncvarlink makes (getattr) goes through this."""

    def __init__(
        self,
        function: Callable[..., Any],
        return_parameter: str | None,
        delay_generator: bool,
        adjust: Callable[[VarlinkMethodSignature], None] | None,
    ) -> None:
        self._function = function
        self._return_parameter = return_parameter
        self._delay_generator = delay_generator
        self._adjust = adjust
        self.__doc__ = function.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._owner = owner
        self._name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        # The interfaces' modules use `from __future__ import annotations`
        # (their wire types are imported when first needed: luod.lazyimport);
        # varlinkmethod reads the annotations as objects.
        unwrapped = inspect.unwrap(self._function)
        try:
            unwrapped.__annotations__ = inspect.get_annotations(unwrapped, eval_str=True)
        except OSError as e:
            if e.errno not in errors.FD_TABLE_FULL:
                raise
            # Reading the annotations imports the wire types: at the
            # open-file limit their file cannot be opened. The call is
            # refused, the method stays unbuilt and its next call tries again.
            raise errors.fd_table_full(e.errno, f"{self._name} is not built yet") from None
        built = varlinkmethod(
            self._function,
            return_parameter=self._return_parameter,
            delay_generator=self._delay_generator,
        )
        signature = varlinksignature(built)
        if self._adjust is not None and signature is not None:
            self._adjust(signature)
        if signature is not None:
            refuse_bools_as_numbers(signature.parameter_type)
        setattr(self._owner, self._name, built)
        return built if instance is None else types.MethodType(built, instance)


class _Number(SimpleVarlinkType):
    """An int or float parameter that refuses true and false. asyncvarlink
    takes them for 1 and 0 (a Python bool is an int): an fd index of true
    named the call's second fd, an owner of true uid 1. varlink's bool is
    no number (sd-json refuses one as an int)."""

    def fromjson(self, obj: Any, oobstate: OOBTypeState = None) -> Any:
        if type(obj) is bool:
            raise ConversionError.expected(self.as_varlink, obj)
        return super().fromjson(obj, oobstate)


def refuse_bools_as_numbers(parameters: VarlinkType) -> None:
    """Every int and float in a method's parameters, however deep (a list's
    records), refuses true and false (_Number). asyncvarlink made each type
    for this method alone: changing it in place changes no other."""
    for vtype in parameters.traverse():
        if type(vtype) is SimpleVarlinkType and vtype.as_varlink in ("int", "float"):
            vtype.__class__ = _Number


# --- plain calls: served without asyncvarlink's per-call steps ---------------

# A plain method: the method, its signature, the converter of its reply.
PlainMethod = tuple[Callable[..., Any], VarlinkMethodSignature, ReplyConverter]
_REPLY_FDS = object()


class PlainMethods:
    """The methods of `registry` that give one reply synchronously and take
    no parameter of asyncvarlink's FileDescriptor type, by their full name
    (io.luod.Custody.PreserveFd): those LuodProtocol serves itself. What
    asyncvarlink's lookup finds under that name (getattr), with the names
    its VarlinkMethodCall would accept. Each is looked up, and its reply's
    converter made, when it is first called: a method no client calls in
    a boot costs nothing (issue 12, goal 2: luod's start)."""

    def __init__(self, registry: VarlinkInterfaceRegistry) -> None:
        self._registry = registry
        self._found: dict[str, PlainMethod] = {}
        # Methods that are served, but not here. Only names of methods:
        # a client's made-up names are not kept (they would grow it).
        self._not_plain: set[str] = set()

    def get(self, name: str) -> PlainMethod | None:
        entry = self._found.get(name)
        if entry is None and name not in self._not_plain:
            entry = self._find(name)
        return entry

    def names(self) -> list[str]:
        """Every plain method's full name (each looked up)."""
        return [
            f"{interface.name}.{name}"
            for interface in self._registry
            for name in dir(interface)
            if self.get(f"{interface.name}.{name}") is not None
        ]

    def _find(self, full: str) -> PlainMethod | None:
        interface_name, _, name = full.rpartition(".")
        interface = self._registry.interfaces.get(interface_name)
        if interface is None or not name[:1].isupper():
            return None
        try:
            validate_interface(interface_name)
            validate_name(name)
        except ValueError:
            return None
        method = getattr(interface, name, None)
        signature = None if method is None else varlinksignature(method)
        if signature is None:
            return None
        if signature.asynchronous or signature.more or _names_fds(signature.parameter_type):
            # asyncvarlink serves it: a subscription, or parameters that
            # need the call's FileDescriptorArray (luod's methods take fds
            # as indexes: take_fd).
            self._not_plain.add(full)
            return None
        assert method is not None
        entry = self._found[full] = (method, signature, reply_converter(signature.return_type))
        return entry


class _ReplyFds(dict[Any, Any]):
    """The out-of-band state of a reply's conversion: its FileDescriptorArray
    made when the first fd is converted (asyncvarlink made one for every
    reply; most carry no fd)."""

    def __missing__(self, key: Any) -> Any:
        if key is not FileDescriptorVarlinkType:
            raise KeyError(key)
        self[key] = array = FileDescriptorArray(_REPLY_FDS)
        return array


# --- protocol: one connection's calls -----------------------------------------


class LuodProtocol(VarlinkInterfaceServerProtocol):
    """Knows its peer, sets the call context, and enforces the limits of a
    connection that are about calls: the idle timeout, protocol violations."""

    peer: Peer

    def __init__(
        self,
        registry: VarlinkInterfaceRegistry,
        limits: Limits,
        plain: PlainMethods | None = None,
    ) -> None:
        super().__init__(registry)
        self.limits = limits
        self._plain = PlainMethods(registry) if plain is None else plain
        self._disconnect_hooks: list[Callable[[], None]] = []
        self._dropped = False
        # Closes the connection unless a whole message comes within the idle
        # timeout: armed when it opens and when a message is begun.
        self._silent: asyncio.TimerHandle | None = None
        # The fds of the message being served (its reply goes out at once).
        self.serving_fds: CallFds | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("luod.peer")
        assert isinstance(peer, Peer)
        self.peer = peer
        loop = asyncio.get_running_loop()
        if self.limits.idle_timeout > 0:
            self._silent = loop.call_later(self.limits.idle_timeout, self._silent_too_long)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """Run `hook` when the peer goes away. A pending `more` call (a
        subscription) would otherwise keep the connection open forever."""
        self._disconnect_hooks.append(hook)

    def _disconnected(self) -> None:
        hooks, self._disconnect_hooks = self._disconnect_hooks, []
        for hook in hooks:
            hook()

    def eof_received(self) -> None:
        self._disconnected()
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._silent is not None:
            self._silent.cancel()
            self._silent = None
        self._disconnected()
        super().connection_lost(exc)

    # -- messages, as LuodTransport frames them

    def frame_received(self, data: bytes, fds: list[int], dropped: bool) -> None:
        """One whole message (without its NUL) and the fds that came with it;
        `dropped`: the kernel dropped some of them (MSG_CTRUNC)."""
        if self._silent is not None:
            self._silent.cancel()
            self._silent = None
        try:
            obj = decode_message(data)
        except ProtocolViolation as e:
            lim.close_fds(fds)
            self.violation(str(e), len(data), len(fds))
            return
        if not self._consumer_queue:
            try:
                plain = self._plain_call(obj)
            except errors.NotReady as e:
                lim.close_fds(fds)
                self._refuse(obj, e)
                return
            if plain is not None:
                # Served now, with its fds as they came (CallFds); what the
                # call did not take is closed when it is done.
                self._dropped = dropped
                self.serving_fds = fds
                try:
                    self._serve_plain(*plain, fds or None)
                finally:
                    self.serving_fds = None
                    close_left(fds)
                return
        reason = _not_a_call(obj)
        if reason is not None:
            lim.close_fds(fds)
            self.violation(reason, len(data), len(fds))
            return
        array = received_fds(fds) if fds else None
        try:
            self._enqueue(obj, array, dropped)
        finally:
            if array is not None:
                array.release(_SENTINEL)

    def _enqueue(self, obj: JSONObject, fds: FileDescriptorArray | None, dropped: bool) -> None:
        # As asyncvarlink's VarlinkProtocol.message_received does it for each
        # message: calls are served in order; the fds live until theirs ran.
        call = functools.partial(self._request, obj, fds, dropped)
        if not self._consumer_queue:
            # Nothing of this connection's waits before it: served now rather
            # than in the next iteration of the loop (asyncvarlink's
            # call_soon). Its fds live until frame_received() releases them
            # after it, or (asyncvarlink's own reference) until the future
            # of a call that returns one; such a call pauses reading as it
            # does there.
            self._consumer_queue.append((call, None))
            self._process_queue(None)
            return
        done = None
        if fds:
            done = asyncio.get_running_loop().create_future()
            fds.reference_until_done(done)
        self._consumer_queue.append((call, done))

    def _request(
        self, obj: JSONObject, fds: FileDescriptorArray | None, dropped: bool
    ) -> asyncio.Future[None] | None:
        self._dropped = dropped
        self.serving_fds = fds
        try:
            fut: asyncio.Future[None] | None = self.request_received(obj, fds)
        finally:
            self.serving_fds = None
        return fut

    def request_received(
        self, obj: JSONObject, fds: FileDescriptorArray | None
    ) -> asyncio.Future[None] | None:
        """A plain call (its method and parameters only: no oneway, more or
        upgrade) of a method that gives one reply is served by _call_plain;
        any other message as asyncvarlink serves it, errors and all."""
        try:
            plain = self._plain_call(obj)
        except errors.NotReady as e:
            self._refuse(obj, e)
            return None
        if plain is None:
            fut: asyncio.Future[None] | None = super().request_received(obj, fds)
            return fut
        self._serve_plain(*plain, fds)
        return None

    def _refuse(self, obj: JSONObject, e: errors.LuodError) -> None:
        """Answer a call refused before its method ran (its method could
        not be built: _LazyMethod)."""
        # Imported already (by the interfaces): no file to open.
        from luod.varlink.replies import reply

        log.info(
            "call-refused",
            method=str(obj.get("method")),
            error=e.error_name,
            detail=str(e),
            peer=self.peer.describe(),
        )
        self.send_error(reply(e))

    def _plain_call(self, obj: JSONObject) -> tuple[PlainMethod, JSONObject] | None:
        """The method and the parameters of a plain call; None for any
        other message."""
        method = obj.get("method")
        entry = self._plain.get(method) if type(method) is str else None
        if entry is None or not (len(obj) == 1 or (len(obj) == 2 and "parameters" in obj)):
            return None
        parameters = obj.get("parameters", {})
        if not isinstance(parameters, dict):
            return None
        return entry, parameters

    def _serve_plain(self, entry: PlainMethod, parameters: JSONObject, fds: CallFds | None) -> None:
        try:
            self._call_plain(entry, parameters, fds)
        except VarlinkErrorReply as err:
            self.send_error(err)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            try:
                self.handle_call_exception(exc, False)
            except VarlinkErrorReply as err:
                self.send_error(err)

    def _call_plain(self, entry: PlainMethod, parameters: JSONObject, fds: CallFds | None) -> None:
        """What call_received and asyncvarlink's call_received and
        _call_sync_method_single do for such a call, in one step: without a
        VarlinkMethodCall (its two regular expressions), the method's lookup
        by name and a FileDescriptorArray for a reply that carries no fd
        (issue 12, goal 7: luod's GetInfo round trip against sd-varlink's).
        Its parameters need no fds (plain_methods): luod's methods take
        them by index (take_fd). The reply is said by the method's own
        converter (luod.varlink.replyconv)."""
        method, signature, say = entry
        ctx = CallContext(self.peer, fds, self, self._dropped)
        token = _current.set(ctx)
        oob = _ReplyFds()
        try:
            try:
                pyparams = signature.parameter_type.fromjson(parameters)
            except ConversionError as err:
                raise InvalidParameter(parameter=err.location[0]) from err
            result = method(**pyparams)
            assert isinstance(result, AnnotatedResult)
            assert not result.continues
            jsonparams = say(result.parameters, oob)
            reply: JSONObject = {"parameters": jsonparams} if jsonparams else {}
            reply.update(result.extensions)
            sent = oob.get(FileDescriptorVarlinkType)
            if sent is None:
                self._send_json(reply, None, False)
            else:
                fds = [fd.fileno() for fd in sent]
                fut = self._send_json(reply, fds, False, ctx.handed_over())
                sent.reference_until_done(fut)
        except BaseException:
            # Its error reply goes out (at once) after this returns.
            ctx.close_untaken()
            ctx.not_replied()
            raise
        finally:
            _current.reset(token)
            sent = oob.get(FileDescriptorVarlinkType)
            if sent is not None:
                sent.release(_REPLY_FDS)

    def send_reply(
        self,
        reply: VarlinkMethodReply,
        fds: list[int] | None = None,
        autoclose: bool = True,
    ) -> asyncio.Future[None]:
        """asyncvarlink's send_reply, without tracking a reply that went out
        at once (LuodTransport sends when nothing waits): its future is done
        already, and each callback on it costs an iteration of the loop."""
        # A call asyncvarlink serves (with more, say) is still current here:
        # its reply is sent before its fds are released, as _call_plain's.
        ctx = _current.get(None) if fds else None
        return self._send_json(
            reply.tojson(), fds, autoclose, None if ctx is None else ctx.handed_over()
        )

    def _send_json(
        self,
        obj: JSONObject,
        fds: list[int] | None,
        autoclose: bool,
        settle: Settle | None = None,
    ) -> asyncio.Future[None]:
        """Send `obj` with `fds`; `settle`: told whether the fds went out
        (on_delivery), a failure before the reply's future's other callbacks."""
        if settle is None or not fds:
            fut = self.send_message(obj, fds, autoclose)
        elif isinstance(transport := self._transport, LuodTransport):
            transport.expect_delivery(fds, settle)
            try:
                fut = self.send_message(obj, fds, autoclose)
            finally:
                transport.expect_delivery(None, None)
        else:
            # No transport (the connection is gone; luod serves every
            # connection with LuodTransport): nothing goes out. Settled by
            # the future's outcome all the same.
            fut = self.send_message(obj, fds, autoclose)
            fut.add_done_callback(lambda f: settle(not f.cancelled() and f.exception() is None))
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            return fut
        fut.add_done_callback(self._on_message_sent)
        self._add_transfer(fut)
        return fut

    @property
    def pending_calls(self) -> int:
        """Calls read but not yet served."""
        return len(self._consumer_queue)

    def violation(
        self,
        reason: str,
        size: int | None,
        fds: int,
        hint: str = "the connection is closed; a varlink message is a JSON object and a NUL",
    ) -> None:
        """The peer sent what is no varlink message (or more than luod takes
        of one, or a call luod cannot serve as asked): close the connection.
        `size`: the message's bytes, if known."""
        said = {} if size is None else {"bytes": size}
        lim.violations.log(
            log.warning,
            "protocol-violation",
            peer=self.peer.describe(),
            reason=reason,
            **said,
            fds=fds,
            hint=hint,
        )
        self.drop()

    def drop(self) -> None:
        """Close the connection now, with what was read and not yet served."""
        while self._consumer_queue:
            _call, done = self._consumer_queue.popleft()
            if done is not None:
                done.set_result(None)  # releases the fds of the call
        if self._transport is not None:
            self._transport.abort()

    def message_begun(self) -> None:
        """Part of a message is read: the rest must come within the idle
        timeout. A connection that had called could otherwise hold an
        unfinished message, with its fds (253) and up to MAX_MESSAGE bytes,
        for as long as it lasts."""
        if self._silent is None and self.limits.idle_timeout > 0:
            loop = asyncio.get_running_loop()
            self._silent = loop.call_later(self.limits.idle_timeout, self._silent_too_long)

    def _silent_too_long(self) -> None:
        """No whole message in the idle timeout since connecting (a
        connection held only to take one of the connections luod serves),
        or since one was begun: closed at once, with the fds of what was
        read and the replies still waiting to be sent."""
        self._silent = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if isinstance(transport, LuodTransport) and transport.reading_paused:
            # luod, not the client, holds the rest back (calls waiting).
            self.message_begun()
            return
        lim.idle_closed.log(
            log.info,
            "connection-idle",
            peer=self.peer.describe(),
            timeout=self.limits.idle_timeout,
        )
        # Not close(): that gives the connection's place back at once but
        # keeps its socket open until the replies waiting in it are sent,
        # that is for as long as the client does not read them; a uid could
        # hold any number of such connections past its cap.
        self.drop()

    def call_received(
        self, call: VarlinkMethodCall, fds: FileDescriptorArray | None
    ) -> asyncio.Future[None] | None:
        if call.oneway and _reply_carries_fds(self._registry, call):
            # A oneway call gets no reply: the fds the method hands out
            # (a file taken out of custody, say) would be closed unsent.
            if fds is not None:
                close_left(fds)
            self.violation(
                f"a oneway call of {call.method}, whose reply carries fds",
                None,
                0 if fds is None else len(fds),
                hint="nothing was done and the connection is closed: the fds would be lost "
                "with the reply a oneway call does not get",
            )
            return None
        ctx = CallContext(self.peer, fds, self, self._dropped)
        token = _current.set(ctx)
        try:
            fut: asyncio.Future[None] | None = super().call_received(call, fds)
        except BaseException:
            ctx.not_replied()
            raise
        finally:
            _current.reset(token)
            # luod's methods take their fds (take_fd) while they are called,
            # before this returns: an asynchronous one (Subscribe, Update)
            # takes none. The rest are closed now: asyncvarlink would keep
            # them until the call's future is done, that is for as long as
            # a subscription lasts (253 fds a call).
            ctx.close_untaken()
        if call.more:
            # asyncvarlink stops reading until the call's future is done; a
            # subscription never is, so the peer going away (EOF) would go
            # unseen. Not handing the future back keeps reading on.
            return None
        return fut


def _reply_carries_fds(registry: VarlinkInterfaceRegistry, call: VarlinkMethodCall) -> bool:
    """Whether the reply of the method `call` names carries fds (an unknown
    method: no, asyncvarlink refuses it as it would)."""
    try:
        _method, signature = registry.lookup_method(call)
    except VarlinkErrorReply:
        return False
    return _names_fds(signature.return_type)


def _names_fds(vtype: VarlinkType) -> bool:
    """Whether values of `vtype` name fds (asyncvarlink's FileDescriptor type)."""
    return any(isinstance(t, FileDescriptorVarlinkType) for t in vtype.traverse())


def _not_a_call(obj: JSONObject) -> str | None:
    """Why a JSON object is no varlink call (no method, flags that are no
    bools or do not go together, parameters that are no object), or None.
    sd-varlink closes the connection on such a message; asyncvarlink would
    answer it with an error of its own and read on."""
    try:
        VarlinkMethodCall.fromjson(obj)
    except (TypeError, ValueError) as e:
        return f"no varlink call: {e}"
    return None


# --- server: accepting, within the connection caps ----------------------------


class LuodServer(VarlinkUnixServer):
    """asyncvarlink's server with the backlog, the peer credentials and the
    connection caps luod needs, and backing off when accept() fails (at the
    open-file limit) instead of trying again in a busy loop."""

    def __init__(
        self,
        sock: socket.socket,
        registry: VarlinkInterfaceRegistry,
        limits: Limits | None = None,
    ) -> None:
        self.limits = Limits() if limits is None else limits
        self.counts = ConnectionCounts(self.limits)
        self.transit = Transit(self.limits)
        self._backoff = 0.0
        self._backoff_handle: asyncio.TimerHandle | None = None
        super().__init__(
            sock,
            functools.partial(LuodProtocol, registry, self.limits, PlainMethods(registry)),
        )

    async def start_serving(self) -> None:
        await super().start_serving()
        # asyncvarlink listens with a backlog of 1; a burst of clients at boot
        # would see ECONNREFUSED.
        if self._sock is not None:
            self._sock.listen(socket.SOMAXCONN)

    def close(self) -> None:
        if self._backoff_handle is not None:
            self._backoff_handle.cancel()
            self._backoff_handle = None
        super().close()

    def abort_handing_over(self) -> None:
        """Abort the connections with a reply waiting that hands something
        over (expect_delivery): what it would hand over comes back, as its
        callbacks run in the loop's next iteration."""
        for transport in self._transports.copy():
            if isinstance(transport, LuodTransport) and transport.handing_over:
                transport.abort()

    def _handle_accept(self) -> None:
        # Several per wakeup: connections over a cap cost little each, and
        # the backlog drains faster under a flood of them.
        for _ in range(_ACCEPTS_PER_WAKEUP):
            if self._sock is None:
                return
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                self._back_off(e)
                return
            self._backoff = 0.0
            self._serve(conn)

    def _back_off(self, error: OSError) -> None:
        """Stop accepting for a while: EMFILE/ENFILE (or ENOMEM, ENOBUFS)
        stay until connections or held files go."""
        assert self._sock is not None
        self._backoff = min(
            lim.ACCEPT_BACKOFF_MAX, max(lim.ACCEPT_BACKOFF_FIRST, self._backoff * 2)
        )
        self._loop.remove_reader(self._sock)
        self._backoff_handle = self._loop.call_later(self._backoff, self._resume_accepting)
        lim.accept_failed.log(
            log.warning,
            "accept-failed",
            error=errno.errorcode.get(error.errno or 0, str(error.errno)),
            retry_in=self._backoff,
            hint=(
                "luod is at its open-file limit (LimitNOFILE=) or out of memory; "
                "new connections wait in the listen backlog"
            ),
        )

    def _resume_accepting(self) -> None:
        self._backoff_handle = None
        if self._sock is not None:
            self._loop.add_reader(self._sock, self._handle_accept)

    def _serve(self, conn: socket.socket) -> None:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
        except OSError:
            conn.close()
            return
        pid, uid, _gid = _CREDS.unpack(creds)
        over = self.counts.admit(uid)
        if over is not None:
            conn.close()
            lim.refused.log(
                log.warning,
                "connection-refused",
                uid=uid,
                pid=pid,
                limit=over,
                hint="closed at once; luod's --max-connections options set the caps",
            )
            return
        try:
            transport = serve_connection(self._loop, conn, self._protocol_factory, self.transit)
        except OSError:
            self.counts.release(uid)
            conn.close()
            return
        self._transports.add(transport)
        counts = self.counts
        transport.closed_future.add_done_callback(lambda _: counts.release(uid))


_CREDS = struct.Struct("3i")
_ACCEPTS_PER_WAKEUP = 128


# --- transport: framing, and the reply queue ----------------------------------

# Messages read from one connection before the others get their turn.
_MESSAGES_PER_WAKEUP = 32
# sendmsg() takes at most IOV_MAX buffers (EMSGSIZE beyond); asyncvarlink
# hands it every queued reply at once.
_IOV_MAX = 512
# socket's MSG_* are enum.IntFlag members: `flags & socket.MSG_CTRUNC` made
# an IntFlag through enum's Python code on every message read (6 K
# instructions of a call's 310 K).
_MSG_PEEK = int(socket.MSG_PEEK)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


class LuodTransport(VarlinkTransport):
    """Reads and frames messages itself. It peeks to find where a message
    ends, so that the fds sent with it are received with it (recvmsg() never
    returns the data of two sendmsg() calls carrying different fds), and
    collects a message longer than one peek in a limits.MessageBuffer
    (linear, bounded). A whole message goes to LuodProtocol.frame_received.

    Sending: at most MAX_QUEUED_REPLY bytes and MAX_QUEUED_REPLY_FDS fds
    wait for a client that does not read; and no more than IOV_MAX buffers
    go to one sendmsg().

    The fds and bytes of a message not yet served and of replies not yet
    sent count against the caps of `transit`, as its peer's uid's
    (limits.Transit): a connection that would take its uid over one is
    closed."""

    RECV_BUFFER_SIZE = 256 * 1024

    def __init__(self, *args: Any, transit: Transit | None = None, **kwargs: Any) -> None:
        self._message = lim.MessageBuffer()
        # Bytes of the message begun counted in transit.bytes.
        self._begun_bytes = 0
        self._eof = False
        self._queued = 0
        self._queued_fds = 0
        # The fds of the message being sent that hand something over, and
        # what to tell whether they went out (expect_delivery); and those
        # of such messages waiting in the queue, by the id of their list.
        self._expecting: tuple[list[int], Settle] | None = None
        self._awaiting: dict[int, tuple[list[int], Settle]] = {}
        # A connection served alone (unit tests) is counted alone.
        transit = Transit(Limits()) if transit is None else transit
        self._transit, self._transit_bytes = transit.fds, transit.bytes
        super().__init__(*args, **kwargs)
        peer = self.get_extra_info("luod.peer")
        assert isinstance(peer, Peer)
        self._uid = peer.uid

    def _handle_read_socket_peek(self) -> None:
        sock = self._recvfd
        assert isinstance(sock, socket.socket)
        protocol = self._protocol
        assert isinstance(protocol, LuodProtocol)
        for _ in range(_MESSAGES_PER_WAKEUP):
            if self._recvfd is None or self._paused or self._closing or self._eof:
                return
            if protocol.pending_calls >= MAX_PENDING_CALLS:
                # asyncvarlink's queue resumes reading once it is empty.
                self.pause_reading()
                return
            try:
                n = sock.recv_into(_peek_buffer, len(_peek_buffer), _MSG_PEEK)
                if n == 0:
                    self._end_of_input()
                    return
                end = _peek_buffer.find(0, 0, n)
                want = n if end < 0 else end + 1
                got, ancdata, flags, _ = sock.recvmsg_into(
                    [_peek_view[:want]], ANCBUF_SIZE, _MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._close_receiver(err)
                return
            received = fds_in(ancdata)
            if got == 0:
                lim.close_fds(received)
                self._end_of_input()
                return
            message = self._message
            whole = _peek_buffer[got - 1] == 0
            if not whole:
                # Kept until the rest comes: counted as its uid's.
                if over := self._transit_bytes.take(self._uid, got):
                    self._refuse_chunk(
                        f"bytes in transit would go over {over}",
                        "luod keeps little of the messages a uid has begun and not finished",
                        got,
                        received,
                    )
                    return
                self._begun_bytes += got
            if received and (over := self._transit.take(self._uid, len(received))):
                self._refuse_chunk(
                    f"fds in transit would go over {over}",
                    "luod holds few fds per uid that are in no custody "
                    "(of messages begun, of replies not read)",
                    got,
                    received,
                )
                return
            try:
                message.add(_peek_view[:got], received, bool(flags & _MSG_CTRUNC))
            except ProtocolViolation as e:
                protocol.violation(str(e), message.size, message.nfds)
                self._drop_message()
                return
            if whole:
                # Served now: its fds are taken into custody or closed by
                # the time frame_received() returns (an asynchronous call
                # takes none; reading pauses while it runs).
                if message.nfds or self._begun_bytes:
                    self._out_of_transit()
                protocol.frame_received(*message.take())
            else:
                protocol.message_begun()
            if got == n < len(_peek_buffer):
                # All the socket held is read: epoll says when there is
                # more (a peek now would mostly be EAGAIN).
                return

    def _refuse_chunk(self, reason: str, why: str, got: int, received: list[int]) -> None:
        """Close the connection over the chunk just read (`got` bytes, the
        fds `received` with it): it would take its uid over a cap in transit."""
        lim.close_fds(received)
        message = self._message
        protocol = self._protocol
        assert isinstance(protocol, LuodProtocol)
        protocol.violation(
            reason,
            message.size + got,
            message.nfds + len(received),
            hint=f"the connection is closed, with its fds; {why}",
        )
        self._drop_message()

    @property
    def reading_paused(self) -> bool:
        return bool(self._paused)

    def _drop_message(self) -> None:
        """Forget the message being read, closing its fds."""
        self._out_of_transit()
        self._message.drop()

    def _out_of_transit(self) -> None:
        """Give back what the message being read counted in transit (its
        fds, the bytes kept of it): it is served or dropped."""
        if self._message.nfds:
            self._transit.give_back(self._uid, self._message.nfds)
        if self._begun_bytes:
            self._transit_bytes.give_back(self._uid, self._begun_bytes)
            self._begun_bytes = 0

    def _end_of_input(self) -> None:
        # As asyncvarlink does at EOF; once only, even if reading resumes.
        self._eof = True
        self._drop_message()
        assert self._recvfd is not None
        self._loop.remove_reader(self._recvfd)
        self._loop.call_soon(self._eof_received)

    def _close_receiver(self, exc: Exception | None = None) -> None:
        self._drop_message()
        super()._close_receiver(exc)

    @property
    def handing_over(self) -> bool:
        """Whether a reply that hands something over waits to be sent."""
        return bool(self._awaiting)

    def expect_delivery(self, fds: list[int] | None, settle: Settle | None) -> None:
        """The next message sent with `fds` (this very list) hands them over
        (a file taken out of custody): call `settle(True)` once they went
        out with it, `settle(False)` should they not, before the other
        callbacks of the message's future (its fds still open then). They
        go out with the first bytes of the message the socket takes.
        (None, None): expect nothing."""
        self._expecting = None if fds is None or settle is None else (fds, settle)

    def send_message(self, data: bytes, fds: list[int] | None = None) -> asyncio.Future[None]:
        settle = None
        if self._expecting is not None:
            expecting, self._expecting = self._expecting, None
            if fds and expecting[0] is fds:
                settle = expecting[1]
        if (
            self._closing
            or self._sendfd is None
            or self._queued > MAX_QUEUED_REPLY
            or (fds and self._queued_fds + len(fds) > MAX_QUEUED_REPLY_FDS)
        ):
            return _not_delivered(self._refuse_send(), settle)
        if not self._sendqueue:
            # The fds of the call that nothing took are closed before its
            # reply goes out (asyncvarlink closed them before its writer ran).
            protocol = self._protocol
            ctx = _current.get(None)
            if ctx is not None and ctx.protocol is protocol:
                ctx.close_untaken()
            elif isinstance(protocol, LuodProtocol) and protocol.serving_fds is not None:
                # Refused before or after the method: nothing is taken now.
                close_left(protocol.serving_fds)
            # Nothing waits before it: sent now. asyncvarlink would register
            # a writer in the next loop iteration, send when the socket says
            # it is writable (it almost always is) and unregister it: three
            # iterations of the loop and two epoll_ctl() per reply.
            try:
                sent = VarlinkTransport._do_write_socket(self, [data], fds or [])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                # As asyncvarlink's _handle_write on a failed send.
                self._close_sender()
                fut = self._loop.create_future()
                fut.set_exception(err)
                return _not_delivered(fut, settle)
            if sent and settle is not None:
                # The fds went with the first byte: delivered.
                settle(True)
                settle = None
            if sent >= len(data):
                fut = self._loop.create_future()
                fut.set_result(None)
                return fut
            if sent:
                # The rest follows alone.
                data, fds = data[sent:], None
        if fds and (over := self._transit.take(self._uid, len(fds))):
            refused = self._refuse_send(f"the fds of its replies in transit would go over {over}")
            return _not_delivered(refused, settle)
        if over := self._transit_bytes.take(self._uid, len(data)):
            if fds:
                self._transit.give_back(self._uid, len(fds))
            refused = self._refuse_send(f"the bytes of its replies in transit would go over {over}")
            return _not_delivered(refused, settle)
        # Counted in transit until sent (_do_write_socket) or dropped
        # (_fail_sendqueue).
        self._queued += len(data)
        fut = super().send_message(data, fds)
        if fds:
            if settle is not None:
                # Delivered once a sendmsg() takes its first bytes
                # (_do_write_socket); else given back when its future fails.
                self._awaiting[id(fds)] = (fds, settle)
                fut.add_done_callback(functools.partial(self._settle, fds))
            # luod holds them until the reply is sent (or the connection fails).
            self._queued_fds += len(fds)
            fut.add_done_callback(functools.partial(self._fds_sent, len(fds)))
        return fut

    def _settle(self, fds: list[int], fut: asyncio.Future[None]) -> None:
        """A message whose fds hand something over is done: if they did not
        go out (its future failed before), say so."""
        entry = self._awaiting.pop(id(fds), None)
        if entry is not None and entry[0] is fds and (fut.cancelled() or fut.exception()):
            entry[1](False)

    def _fds_sent(self, count: int, _fut: asyncio.Future[None]) -> None:
        self._queued_fds -= count
        self._transit.give_back(self._uid, count)

    def _refuse_send(self, over: str | None = None) -> asyncio.Future[None]:
        """Refuse a reply (the connection goes): more than a connection may
        leave waiting, or `over`: which cap of its uid's in transit it would
        go over."""
        # asyncvarlink warns of each reply to a closed transport: no
        # warning per reply of a client that went away or was cut off.
        if not self._closing and self._sendfd is not None:
            protocol = self._protocol
            assert isinstance(protocol, LuodProtocol)
            lim.not_reading.log(
                log.warning,
                "client-not-reading",
                peer=protocol.peer.describe(),
                queued=self._queued,
                queued_fds=self._queued_fds,
                hint=(
                    f"more than {MAX_QUEUED_REPLY} bytes or {MAX_QUEUED_REPLY_FDS} fds "
                    "of replies waited; disconnected"
                    if over is None
                    else f"{over}; disconnected"
                ),
            )
            protocol.drop()
        fut = self._loop.create_future()
        fut.set_exception(BrokenPipeError())
        return fut

    def _do_write_socket(self, data: list[bytes], fds: list[int]) -> int:
        sent = super()._do_write_socket(data[:_IOV_MAX], fds)
        if fds and sent and self._awaiting:
            # Its fds went out with these bytes: delivered, whatever follows.
            entry = self._awaiting.get(id(fds))
            if entry is not None and entry[0] is fds:
                del self._awaiting[id(fds)]
                entry[1](True)
        self._queued -= sent
        self._transit_bytes.give_back(self._uid, sent)
        return sent

    def _fail_sendqueue(self) -> None:
        super()._fail_sendqueue()
        # The replies not sent are dropped with the connection.
        if self._queued:
            self._transit_bytes.give_back(self._uid, self._queued)
            self._queued = 0


def _not_delivered(fut: asyncio.Future[None], settle: Settle | None) -> asyncio.Future[None]:
    """`fut`, failed without its fds going out: call `settle(False)` (if
    any) first among its callbacks."""
    if settle is not None:
        fut.add_done_callback(lambda _fut: settle(False))
    return fut


# One buffer for every read of every connection (luod serves from one thread):
# a fresh 256 KiB bytes object per peek cost 18 us on the host (the heap
# shrinking and growing again), 16 times the peek itself.
_peek_buffer = bytearray(LuodTransport.RECV_BUFFER_SIZE)
_peek_view = memoryview(_peek_buffer)


def serve_connection(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    factory: Callable[[], Any],
    transit: Transit | None = None,
) -> LuodTransport:
    """Serve one accepted connection with luod's transport; its fds and
    bytes in transit count in `transit` (None: alone)."""
    conn.setblocking(False)
    return LuodTransport(
        loop, conn, conn, factory(), {"luod.peer": peer_of_socket(conn)}, transit=transit
    )
