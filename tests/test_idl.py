"""The IDL files in protocol/ are the contract: what luod serves must equal them."""

from __future__ import annotations

from pathlib import Path

from luod.varlink.registry import interface_descriptions

PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"


def test_protocol_files_equal_what_luod_serves() -> None:
    served = interface_descriptions()
    files = {p.stem: p.read_text() for p in PROTOCOL.glob("*.varlink")}
    assert set(files) == set(served), "one IDL file per interface (make idl)"
    for name, text in served.items():
        assert files[name] == text, (
            f"protocol/{name}.varlink differs from what luod.varlink serves (make idl)"
        )


def test_no_nested_or_optional_element_types() -> None:
    """systemd's IDL parser rejects []?T and [][]T; wrap those in a struct."""
    for name, text in interface_descriptions().items():
        assert "[]?" not in text and "[][]" not in text, name
