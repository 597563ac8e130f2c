"""luod: the userspace half of Linux's Live Update Orchestrator."""

__version__ = "0.1.0"
