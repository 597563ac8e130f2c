"""luod's benchmarks: `make bench` on a real LUO kernel under QEMU (host
side bench/run.py and its report bench/report.py; guest side bench/guest.py
with bench/handoff.py and bench/reclaim.py), the update barrier on the host
(bench/barrier.py) and `make bench-systemd` against a service's own fd store
(bench/systemd.py). They boot through testsupport's VM harness, print ratios
measured in the same run and never assert on time."""
