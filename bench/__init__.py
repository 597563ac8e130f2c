"""luod's benchmarks on a real LUO kernel under QEMU: `make bench`
(host side bench/run.py, guest side bench/guest.py). They print ratios
measured in the same run and never assert on time."""
