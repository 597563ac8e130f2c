"""Test support: code the tests, the VM tiers and the bench share, kept out of the
runtime package so luod never ships or imports a test double (the fake kernel,
the luod process wrapper, the VM/guest harness, the fake PID 1)."""
