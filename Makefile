# luod's front door. `make test` runs every test tier; `make demo` runs a
# live update in a VM end to end. Both install what they need themselves.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: all venv deps lint test test-fast test-vm test-vm-a test-vm-b test-systemd test-systemd-a test-systemd-b test-chain-1 test-chain-2 demo demo-vm bench bench-systemd idl kernel root tools man wheel deb debdeps clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Host packages (bookworm) the VM tier needs; a fast no-op when present.
deps:
	vm/host-deps.sh all

lint: venv
	$(VENV)/bin/ruff check luod tests testsupport tools $(wildcard bench/*.py) $(wildcard examples)
	$(VENV)/bin/ruff format --check luod tests testsupport tools $(wildcard bench/*.py) $(wildcard examples)
	$(VENV)/bin/mypy --strict luod tests testsupport tools $(wildcard bench/*.py) $(wildcard examples/*/*.py)

# The IDL files in protocol/ are rendered from luod/varlink/'s types and
# luod/errors.py's catalogue; tests/test_idl.py fails when they differ.
idl: venv
	$(PY) -m luod.varlink.registry protocol

# luod(8), luoctl(1), luod.varlink(7) and luoctl's bash/zsh completion,
# rendered from the parsers and the served IDL into build/docs (tools/gendocs.py;
# tests/test_manpages.py checks them).
man: venv
	$(PY) -m tools.gendocs build/docs

# The wheel (luod, luoctl, the typed client; never testsupport) in dist/.
wheel: venv
	$(PY) -m build --wheel --outdir dist .

# luod's Debian package, for unstable, in dist/ (tools/build-deb.sh: built
# on the host with bookworm's debhelper, lintian-clean, cached by its inputs).
deb: man
	tools/build-deb.sh dist

# systemd 262's varlinkctl and systemd-analyze from sid, unpacked privately.
tools:
	tools/sid-systemd.sh

kernel: deps
	vm/build-kernel.sh stock
	vm/build-kernel.sh magic
	vm/build-kernel.sh abi

# debdeps: tests/test_deb.py builds the package (tools/build-deb.sh).
debdeps:
	vm/host-deps.sh deb

# --durations: every CI log says what each test cost (the CI budget is
# 25 minutes warm; the QEMU tiers are most of it). The fast tier's tests
# each wait on a luod and a fake kernel of their own: -n auto (pytest-xdist)
# runs them on every core (246 -> 110 s on 2 cores).
test-fast: venv tools debdeps
	LUOD_REQUIRE_SID_TOOLS=1 $(PYTEST) -q -n auto --durations=10 -m "not vm and not systemd" tests

# The VM tier in two pytest runs of about equal length, so that `make test`
# can pair each with a systemd run: test_luod.py's scenarios, and the others.
VM_A := tests/vm/test_luod.py
VM_A_RUN = $(PYTEST) -q --durations=0 -m vm $(VM_A)
VM_B_RUN = $(PYTEST) -q --durations=0 -m vm tests/vm $(addprefix --ignore=,$(VM_A))

test-vm: test-vm-a test-vm-b

test-vm-a: venv deps kernel
	$(VM_A_RUN)

test-vm-b: venv deps kernel
	$(VM_B_RUN)

# A Debian sid root with systemd 262 (debootstrap, cached by its inputs).
root: deps
	vm/build-root.sh >/dev/null

# The systemd tier's five runs are most of `make test`'s time: two pytest
# runs share them, a guest each, so that `make test` can run either next to
# another part. The first takes these files (the three of guest/cycle.sh's
# run stay together), the second all the others (a new file lands there).
# Each is paired with a VM-tier run below so that the two chains take about
# as long as each other (CI of b4c7d5c: 732 + 287 against 433 + 538 s).
SYSTEMD_A := $(addprefix tests/systemd/,test_coexistence.py test_qemu_cpr.py \
	test_socket_activation.py test_handoff.py test_handback.py)
SYSTEMD_A_RUN = $(PYTEST) -q --durations=0 -m systemd $(SYSTEMD_A)
SYSTEMD_B_RUN = $(PYTEST) -q --durations=0 -m systemd tests/systemd $(addprefix --ignore=,$(SYSTEMD_A))

test-systemd: test-systemd-a test-systemd-b

test-systemd-a: venv deps root
	vm/build-kernel.sh stock >/dev/null
	$(SYSTEMD_A_RUN)

test-systemd-b: venv deps root
	vm/build-kernel.sh stock >/dev/null
	$(SYSTEMD_B_RUN)

# `make test` runs the four QEMU parts as two chains at once, so that two
# guests run at a time and a VM-tier guest always runs next to a systemd one.
# A guest runs TCG on one host thread (testsupport/vm/qemu.py, qemu_command):
# two fill 2 cores without slowing each other, where one alone leaves the
# machine half idle. A VM-tier guest also keeps QEMU's 9p server busy (its
# root is the host's /): in CI, test-vm-b and test-vm-a at once took 430
# and 530 s, against 290 and 430 s each next to a systemd guest (warm CI
# 1,510 against 1,211 s in all), and three guests at once were slower.
# Each chain runs its second part also when the first failed, and fails if
# either did; its output is shown whole when it ends. The guests share
# nothing but the caches, whose builders take a lock.
test-chain-1: venv deps root kernel
	status=0; $(SYSTEMD_A_RUN) || status=1; $(VM_B_RUN) || status=1; exit $$status

test-chain-2: venv deps root kernel
	status=0; $(VM_A_RUN) || status=1; $(SYSTEMD_B_RUN) || status=1; exit $$status

test: lint test-fast
	@echo "test-chain-1 (test-systemd-a, then test-vm-b) and test-chain-2 (test-vm-a, then test-systemd-b) at once; each one's output follows when it ends"
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-chain-1 test-chain-2

demo: venv deps
	vm/build-kernel.sh stock >/dev/null
	$(PY) -m tests.vm.demo

# A QEMU VM through the host's live update (examples/qemu-cpr/, QEMU 11 in the
# sid root), with the guest's pause part by part; the scenario of
# tests/systemd/test_qemu_cpr.py.
demo-vm: venv deps root
	vm/build-kernel.sh stock >/dev/null
	$(PY) -m tests.systemd.demo_vm

bench: venv deps root
	vm/build-kernel.sh stock >/dev/null
	$(PY) -m bench.run
	$(PY) -m bench.barrier 100
	$(PY) -m bench.others 5000
	$(PY) -m bench.systemd

# luod under systemd 262 next to systemd's own means, across a real kexec: issue 12
# goals 1, 2, 3 and 7, and 1,000 memfds into luod vs into an fd store.
bench-systemd: venv deps root
	vm/build-kernel.sh stock >/dev/null
	$(PY) -m bench.systemd

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist
