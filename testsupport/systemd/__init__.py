"""The systemd tier's harness: a Debian sid root with systemd 262 as PID 1
and luod installed, booted under QEMU (harness), and the helpers its stage
programs run in the guest (guest/). Used by tests/systemd and bench/systemd.py."""
