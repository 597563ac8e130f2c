"""A quicker asyncvarlink conversion for long lists of flat records.

asyncvarlink converts every field of every element through a context
manager that records where a conversion error happened. For PreserveFds
with a few hundred files that cost more than the kernel's PRESERVE_FD itself
(bench/RESULTS.md). `FlatRecordList` converts a list of a dataclass whose
fields are all plain scalars in one pass per element, and hands anything it
does not recognise to asyncvarlink's own conversion, so errors read exactly
as before. `FdRecordList` does the same for a reply's list of records of an
fd and flat records (RetrieveFds). Each is a ListVarlinkType of the same
dataclass: the interface description is the same (tests/test_idl.py
compares it with protocol/).
"""

from __future__ import annotations

import dataclasses
import operator
import typing

from asyncvarlink import FileDescriptor, FileDescriptorArray
from asyncvarlink.conversion import (
    ConversionError,
    DataclassVarlinkType,
    FileDescriptorVarlinkType,
    ListVarlinkType,
    ObjectVarlinkType,
    OOBTypeState,
    VarlinkType,
)

from luod.varlink.transport import is_reply_fd

_SCALARS = (str, int, float, bool)


class FlatObject(ObjectVarlinkType):
    """A method's parameters when each is a scalar or a list of str, the
    optional ones dropped when None (as asyncvarlink's varlinkmethod builds
    them): checked in one pass, without asyncvarlink's context manager per
    key. Anything else (a wrong type, a missing or unknown key, null) goes
    to asyncvarlink's conversion, so errors read exactly as before. The
    interface description is the same: the keys in the order given."""

    def __init__(self, fields: dict[str, typing.Any], optional: typing.Collection[str] = ()):
        typemap: dict[str, VarlinkType] = {}
        self.kinds: dict[str, type | None] = {}  # None: a list of str
        for name, annotation in fields.items():
            vtype = VarlinkType.from_type_annotation(annotation)
            typemap[name] = vtype.optional() if name in optional else vtype
            if annotation in _SCALARS:
                self.kinds[name] = annotation
            elif annotation == list[str]:
                self.kinds[name] = None
            else:
                raise TypeError(f"{name}: neither a scalar nor a list of str")
        super().__init__(typemap, discardnone=frozenset(optional))
        self.required = frozenset(fields) - frozenset(optional)

    def fromjson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        if type(obj) is dict:
            kinds = self.kinds
            for name, value in obj.items():
                kind = kinds.get(name, False)
                if kind is None:
                    if type(value) is not list or not all(type(v) is str for v in value):
                        break
                elif type(value) is not kind:
                    break  # also an unknown key (False) and null
            else:
                if self.required.issubset(obj):
                    return dict(obj)
        return super().fromjson(obj, oobstate)


class FlatReply(ObjectVarlinkType):
    """A reply of flat records (FlatRecord) under their keys, said without
    asyncvarlink's context manager per key; anything unexpected goes to
    asyncvarlink's conversion (FlatRecord converts without side effects,
    so it may run again there)."""

    def __init__(self, records: dict[str, FlatRecord]) -> None:
        super().__init__(dict(records))
        self.records = dict(records)

    def tojson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        if type(obj) is dict and obj.keys() == self.records.keys():
            try:
                return {k: vtype.tojson(obj[k], oobstate) for k, vtype in self.records.items()}
            except ConversionError:
                pass
        return super().tojson(obj, oobstate)


class FlatRecord(DataclassVarlinkType):
    """A dataclass whose fields are all plain scalars, said in one pass
    (tojson; FlatRecordList reads a list of them in one pass too)."""

    def __init__(self, record: type) -> None:
        super().__init__(record)
        fields = dataclasses.fields(record)
        self.types = tuple(f.type for f in fields)
        if not all(t in _SCALARS for t in self.types):
            raise TypeError(f"{record.__name__} is not a flat record of scalars")
        if len(fields) < 2:
            # itemgetter of one name gives the value, not a tuple.
            raise TypeError(f"{record.__name__} has fewer than two fields")
        self.record = record
        self.names = tuple(f.name for f in fields)
        # The field values of a dict, in one C call (KeyError if one is missing).
        self.values = operator.itemgetter(*self.names)

    def fits(self, d: typing.Any) -> bool:
        """Exactly the declared keys, each of exactly its type: bool is not
        accepted for int here (the generic path decides about that)."""
        try:
            return (
                type(d) is dict
                and len(d) == len(self.names)
                and tuple(map(type, self.values(d))) == self.types
            )
        except KeyError:
            return False

    def tojson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        if type(obj) is self.record:
            d = obj.__dict__
            if self.fits(d):
                return d.copy()
        return super().tojson(obj, oobstate)


class FlatRecordList(ListVarlinkType):
    def __init__(self, record: type) -> None:
        self.item = FlatRecord(record)
        super().__init__(self.item)
        self.record = record

    # One loop per list (a generator per element cost as much as the
    # element's own conversion: a PreserveFds of 250 files converts 500).

    def fromjson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        if type(obj) is list:
            fits, record = self.item.fits, self.record
            out = []
            for d in obj:
                if not fits(d):
                    break
                out.append(record(**d))
            else:
                return out
        return super().fromjson(obj, oobstate)

    def tojson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        if type(obj) is list:
            fits, record = self.item.fits, self.record
            out = []
            for r in obj:
                if type(r) is not record or not fits(r.__dict__):
                    break
                out.append(r.__dict__.copy())
            else:
                return out
        return super().tojson(obj, oobstate)


# How FdRecordList says one field: an fd (None), a scalar (its type), or a
# flat record (its type and its fields' names and types).
_Field = tuple[str, "type | tuple[type, tuple[tuple[str, type], ...]] | None"]


class FdRecordList(ListVarlinkType):
    """Replies only (tojson): a list of a dataclass whose fields are fds
    (FileDescriptor, added to the reply's fds as asyncvarlink adds them),
    scalars or flat records of scalars, in one pass per element."""

    def __init__(self, record: type) -> None:
        super().__init__(DataclassVarlinkType(record))
        plan: list[_Field] = []
        for f in dataclasses.fields(record):
            if f.type is FileDescriptor:
                plan.append((f.name, None))
            elif f.type in _SCALARS:
                plan.append((f.name, typing.cast(type, f.type)))
            elif isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
                inner = tuple((g.name, g.type) for g in dataclasses.fields(f.type))
                if not all(t in _SCALARS for _, t in inner):
                    raise TypeError(f"{record.__name__}.{f.name} is not a flat record")
                plan.append((f.name, (f.type, typing.cast(tuple[tuple[str, type], ...], inner))))
            else:
                raise TypeError(f"{record.__name__}.{f.name}: neither an fd, a scalar nor flat")
        self.record = record
        self.plan = tuple(plan)

    def _fits(self, r: typing.Any) -> bool:
        if type(r) is not self.record:
            return False
        for name, how in self.plan:
            v = getattr(r, name)
            if how is None:
                if not is_reply_fd(v):
                    return False
            elif isinstance(how, tuple):
                kind, inner = how
                if type(v) is not kind or not all(type(getattr(v, n)) is t for n, t in inner):
                    return False
            elif type(v) is not how:
                return False
        return True

    def tojson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        # Looked up as asyncvarlink's FileDescriptorVarlinkType does (by
        # key: a reply's state may make its array on first use).
        try:
            fds = None if oobstate is None else oobstate[FileDescriptorVarlinkType]
        except KeyError:
            fds = None
        if (
            type(obj) is list
            and isinstance(fds, FileDescriptorArray)
            and all(self._fits(r) for r in obj)
        ):
            out = []
            for r in obj:
                d: dict[str, typing.Any] = {}
                for name, how in self.plan:
                    v = getattr(r, name)
                    if how is None:
                        d[name] = fds.add(v)
                    elif isinstance(how, tuple):
                        d[name] = v.__dict__.copy()
                    else:
                        d[name] = v
                out.append(d)
            return out
        return super().tojson(obj, oobstate)
