"""The interfaces luod serves, put together; and their IDL text.

`make_registry` is what the daemon serves on its socket: io.luod.Custody,
io.luod.Manager and the varlink service interface. `interface_descriptions`
renders luod's two interfaces as served; `python -m luod.varlink.registry
DIR` (make idl) writes them to DIR/<interface>.varlink, the files in
protocol/ that tests/test_idl.py compares with this rendering.
"""

from __future__ import annotations

import sys

from asyncvarlink import VarlinkInterfaceRegistry
from asyncvarlink.serviceinterface import VarlinkServiceInterface

import luod
from luod.custody import Custodian
from luod.interfaces import CUSTODY, MANAGER
from luod.nextkernel import NextKernel
from luod.orchestrator import Orchestrator
from luod.varlink.custody import CustodyInterface
from luod.varlink.manager import ManagerInterface


def make_registry(
    custodian: Custodian, orchestrator: Orchestrator, nextkernel: NextKernel
) -> VarlinkInterfaceRegistry:
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(CustodyInterface(custodian))
    registry.register_interface(ManagerInterface(custodian, orchestrator, nextkernel))
    registry.register_interface(
        VarlinkServiceInterface(
            "luod project",
            "luod",
            luod.__version__,
            "file:///usr/share/doc/luod/README.md",
            registry,
        )
    )
    return registry


def interface_descriptions() -> dict[str, str]:
    """The IDL text of each luod interface, as served."""
    return {
        CUSTODY: CustodyInterface.render_interface_description(),
        MANAGER: ManagerInterface.render_interface_description(),
    }


def main() -> None:
    """`python -m luod.varlink.registry DIR`: write the IDL files (make idl)."""
    import pathlib  # not on luod's start (luod.config says why)

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "protocol")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in interface_descriptions().items():
        (out / f"{name}.varlink").write_text(text)


if __name__ == "__main__":
    main()
