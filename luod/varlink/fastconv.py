"""A quicker asyncvarlink conversion for long lists of flat records.

asyncvarlink converts every field of every element through a context
manager that records where a conversion error happened. For PreserveFds
with a few hundred files that cost more than the kernel's PRESERVE_FD itself
(bench/RESULTS.md). `FlatRecordList` converts a list of a dataclass whose
fields are all plain scalars in one pass per element, and hands anything it
does not recognise to asyncvarlink's own conversion, so errors read exactly
as before. It is a ListVarlinkType of the same dataclass: the interface
description is the same (tests/test_idl.py compares it with protocol/).
"""

from __future__ import annotations

import dataclasses
import typing

from asyncvarlink.conversion import (
    DataclassVarlinkType,
    ListVarlinkType,
    OOBTypeState,
)

_SCALARS = (str, int, float, bool)


class FlatRecordList(ListVarlinkType):
    def __init__(self, record: type) -> None:
        super().__init__(DataclassVarlinkType(record))
        fields = dataclasses.fields(record)
        types = tuple(f.type for f in fields)
        if not all(t in _SCALARS for t in types):
            raise TypeError(f"{record.__name__} is not a flat record of scalars")
        self.record = record
        self.fields = tuple(zip((f.name for f in fields), types, strict=True))

    def _fits(self, d: typing.Any) -> bool:
        # Exactly the declared keys, each of exactly its type: bool is not
        # accepted for int here (the generic path decides about that).
        return (
            type(d) is dict
            and len(d) == len(self.fields)
            and all(type(d.get(name)) is t for name, t in self.fields)
        )

    def fromjson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        if type(obj) is list and all(self._fits(d) for d in obj):
            record = self.record
            return [record(**d) for d in obj]
        return super().fromjson(obj, oobstate)

    def tojson(self, obj: typing.Any, oobstate: OOBTypeState = None) -> typing.Any:
        if type(obj) is list and all(type(r) is self.record for r in obj):
            out = [r.__dict__.copy() for r in obj]
            if all(self._fits(d) for d in out):
                return out
        return super().tojson(obj, oobstate)
