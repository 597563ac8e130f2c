"""Errors of luod's core, each named for what went wrong.

The core raises these; the varlink server turns each into the error of the
same name in the interface it was called on, with the same parameters.
"""

from __future__ import annotations


class LuodError(Exception):
    """Base: `parameters` are the varlink error parameters, `message` is for humans."""

    interface = "io.luod.Custody"

    def __init__(self, text: str, /, **parameters: object) -> None:
        super().__init__(text)
        self.message = text
        self.parameters = parameters

    @property
    def error_name(self) -> str:
        return f"{self.interface}.{type(self).__name__}"


class NoSuchSession(LuodError):
    def __init__(self, session: str) -> None:
        super().__init__(f"no session named '{session}'", session=session)


class NoSuchFd(LuodError):
    def __init__(self, session: str, name: str) -> None:
        super().__init__(
            f"session '{session}' holds no fd named '{name}'", session=session, name=name
        )


class SessionExists(LuodError):
    def __init__(self, session: str) -> None:
        super().__init__(f"a session named '{session}' exists already", session=session)


class FdNameExists(LuodError):
    def __init__(self, session: str, name: str) -> None:
        super().__init__(
            f"session '{session}' holds an fd named '{name}' already", session=session, name=name
        )


class InvalidName(LuodError):
    def __init__(self, parameter: str, value: str, reason: str) -> None:
        super().__init__(
            f"invalid {parameter} '{value}': {reason}", parameter=parameter, reason=reason
        )


class ReservedSessionName(LuodError):
    def __init__(self, session: str, reason: str) -> None:
        super().__init__(
            f"session name '{session}' is reserved: {reason}", session=session, reason=reason
        )


class UnsupportedFd(LuodError):
    """The fd is of a kind the kernel cannot carry over a kexec."""

    def __init__(self, parameter: str, kind: str, reason: str) -> None:
        super().__init__(f"{parameter}: {reason}", parameter=parameter, kind=kind, reason=reason)


class MissingFd(LuodError):
    """A fileDescriptor index points past the fds sent with the message."""

    def __init__(self, parameter: str, index: int) -> None:
        super().__init__(
            f"{parameter}: no file descriptor with index {index} was sent with the call",
            parameter=parameter,
            index=index,
        )


class TooManyOpenFiles(LuodError):
    """The fd was sent, but luod was at its open-file limit: the kernel
    dropped the fds it could not install (MSG_CTRUNC)."""

    def __init__(self, parameter: str, index: int, limit: int) -> None:
        super().__init__(
            f"{parameter}: file descriptor {index} was dropped on the way in: luod is at its "
            f"limit of {limit} open files (LimitNOFILE=)",
            parameter=parameter,
            index=index,
            limit=limit,
        )


class PermissionDenied(LuodError):
    def __init__(self, session: str, owner: str) -> None:
        super().__init__(
            f"session '{session}' belongs to {owner}; only its owner or root may use it",
            session=session,
        )


class WrongSessionKind(LuodError):
    def __init__(self, session: str, kind: str, reason: str) -> None:
        super().__init__(
            f"session '{session}' ({kind}): {reason}", session=session, kind=kind, reason=reason
        )


class KernelRefused(LuodError):
    """The kernel refused an operation luod had checked; `errno` says how."""

    def __init__(
        self, operation: str, errno: int, message: str, session: str | None = None
    ) -> None:
        params: dict[str, object] = {"operation": operation, "errno": errno, "message": message}
        if session is not None:
            params["session"] = session
        super().__init__(f"{operation}: {message}", **params)


class NotReady(LuodError):
    """luod cannot do this now (state not reclaimed, manifest broken, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, reason=reason)


class PreflightFailed(LuodError):
    interface = "io.luod.Manager"

    def __init__(self, problems: int, reason: str) -> None:
        super().__init__(reason, problems=problems, reason=reason)


class RootRequired(LuodError):
    interface = "io.luod.Manager"

    def __init__(self, method: str) -> None:
        super().__init__(f"{method} needs root", method=method)


class AlreadyPreserved(LuodError):
    """The same file is in luod's custody already (a file can be in one session only)."""

    def __init__(self, parameter: str, session: str, name: str) -> None:
        super().__init__(
            f"{parameter}: this file is held already as '{name}' in session '{session}'",
            parameter=parameter,
            session=session,
            name=name,
        )


class KernelUnusable(LuodError):
    """The kernel image or initrd cannot be loaded for kexec."""

    interface = "io.luod.Manager"

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"{parameter}: {reason}", parameter=parameter, reason=reason)
