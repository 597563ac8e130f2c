"""The bare VM tier's harness: a LUO kernel under QEMU with the host's / as
the guest's root (qemu), host-stamped guest events (timeline) and the
helpers of the programs that run inside (guestlib). Used by tests/vm, the
demo and bench; the systemd tier (testsupport.systemd) boots through qemu too."""
