"""The kernel layer: everything luod asks of Linux about LUO and kexec.

uapi (the /dev/liveupdate ioctls, struct layouts and errno meanings),
fdinfo (what kind of file an fd is), kexec (kexec_file_load and the reboot
syscall) and backend (the `Backend` protocol the rest of luod uses, and
`KernelBackend`, the real kernel). Imports go one way — backend uses the
other three, which raise OSError and use nothing above them.
"""
