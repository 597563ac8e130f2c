"""A module imported when one of its names is first read.

luod's varlink interfaces name their wire types (luod.varlink.types) in
their methods' signatures, which are read when a method is first looked up
(luod.varlink.transport.lazy_varlinkmethod), and in the methods' bodies.
Importing the module makes about 20 classes, 4 % of luod's start, which a
start does not need (issue 12, goal 2): the interfaces hold it as a lazy
module instead, which importlib runs on the first attribute read.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


class _LazyModule(ModuleType):
    """A module not run yet: the first read of a name it lacks runs it.
    Not importlib's LazyLoader: that one makes the module a plain one
    before running it, so a run that fails (EMFILE: luod at its open-file
    limit cannot open the module's file) leaves it empty for good, and
    every later call that reads it fails. This one stays lazy until a run
    succeeds, and the next read tries again."""

    def __getattr__(self, attr: str) -> object:
        spec = self.__spec__
        assert spec is not None and spec.loader is not None
        before = set(self.__dict__)
        try:
            spec.loader.exec_module(self)
        except BaseException:
            # Forget what a run that failed half way defined: the next run
            # makes its classes anew, and none of the failed run's may be
            # handed out meanwhile (two classes of one name).
            for name in set(self.__dict__) - before:
                del self.__dict__[name]
            raise
        self.__class__ = ModuleType  # type: ignore[assignment]
        return getattr(self, attr)


def lazy_module(name: str) -> ModuleType:
    """The module `name`, run when an attribute of it is first read; the
    module itself if it is imported already. It is in sys.modules and its
    package at once, so that an import of it elsewhere gets this one."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _LazyModule
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module
