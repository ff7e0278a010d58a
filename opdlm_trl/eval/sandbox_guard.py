"""Child side of the pass@1 runner: contain this process, then run one model-written program.

Run as a script by :func:`opdlm_trl.eval.sandbox.run_program` (standard library only, so it works under
``python -I`` from any working directory)::

    python -I -B sandbox_guard.py CONTAIN CPU_SECONDS MEMORY_BYTES PROGRAM

In order, before the first line of ``PROGRAM`` runs:

1. ``CONTAIN=1`` (the process was started by ``unshare`` in fresh user, mount, network, pid, IPC and
   UTS namespaces): every mount becomes read-only, ``nodev`` and ``nosuid`` except a bind mount of the
   work dir (the folder holding ``PROGRAM``), then every capability is dropped for good, so the program
   cannot undo the mounts. Any failure exits with :data:`SETUP_FAILED` and a ``SETUP_MARKER`` line
   (the parent then refuses to score, rather than scoring without the containment it asked for).
2. CPU-time, address-space, file-size and core-dump limits.
3. The in-process guard: the Python functions that spawn or signal processes, reach the network,
   change limits, or change the file system outside the work dir raise :class:`PermissionError`.
   This layer stops accidents, not attackers (``ctypes`` reaches libc directly); the namespaces of
   step 1 are what hold against a program that bypasses it.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import functools
import io
import os
import resource
import runpy
import sys

SETUP_FAILED = 90
SETUP_MARKER = "opdlm-sandbox-setup-failed"

# <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
_KEPT_OPTIONS = {"noexec": MS_NOEXEC, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
# <linux/prctl.h>, <linux/capability.h>, <linux/securebits.h>
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 24, 28, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SECUREBITS_ALL_LOCKED = 0xFF  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS, NO_CAP_AMBIENT_RAISE, each locked

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SetupError(RuntimeError):
    """The namespaces were created but could not be made read-only / unprivileged."""


# --------------------------------------------------------------------------------- 1. namespaces


def _libc_call(name: str, *args) -> int:
    """Call a libc function; raise :class:`SetupError` with errno's text when it returns -1."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(libc, name)(*args)
    if result == -1:
        code = ctypes.get_errno()
        raise SetupError(f"{name}{args[:2]!r}: {os.strerror(code)}")
    return result


def _mount_points() -> list[tuple[str, set[str]]]:
    """``(mount point, per-mount options)`` of every mount this namespace sees (``/proc/self/mountinfo``)."""
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")  # "\040" stands for a space
            points.append((target, set(fields[5].split(","))))
    return points


def _remount_flags(options: set[str]) -> int:
    """Flags for a bind remount that keep the options the kernel locks (noexec, atime) and add ro/nodev/nosuid."""
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
    for name, flag in _KEPT_OPTIONS.items():
        if name in options:
            flags |= flag
    if not options & {"noatime", "relatime"}:
        flags |= MS_STRICTATIME
    return flags


def read_only_view(workdir: str) -> None:
    """Make every mount read-only (and device files unusable) except a bind mount of ``workdir``.

    ``nodev`` matters when the caller is real root: the namespace's root then owns the host's device
    files, and a read-only mount does not stop writes to a device node.
    """
    _libc_call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates to the host
    path = os.fsencode(workdir)
    _libc_call("mount", path, path, None, MS_BIND, None)
    for target, options in _mount_points():
        flags = _remount_flags(options) | (0 if os.path.realpath(target) == workdir else MS_RDONLY)
        try:
            _libc_call("mount", None, os.fsencode(target), None, flags, None)
        except SetupError as error:
            if os.path.exists(target):  # a mount point hidden under a later mount cannot be reached anyway
                raise SetupError(f"cannot make {target} read-only: {error}") from None
    os.chdir(workdir)  # the old working directory still points into the (now read-only) mount below


def drop_privileges() -> None:
    """Give up every capability of the namespace's root for good (no way back through exec or setuid).

    Without this the program, root of its user namespace, could simply remount the file system
    read-write again.
    """
    libc_prctl = functools.partial(_libc_call, "prctl")
    libc_prctl(PR_SET_SECUREBITS, _SECUREBITS_ALL_LOCKED, 0, 0, 0)
    for capability in range(64):
        try:
            libc_prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
        except SetupError:
            if ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the last capability this kernel knows
                raise
            break
    libc_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2 words) all empty
    _libc_call("capset", header, data)
    libc_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def verify(workdir: str) -> None:
    """Check the containment really holds: nothing outside the work dir is writable, no network device."""
    import socket

    outside = os.path.join(os.path.dirname(workdir), f".opdlm-sandbox-probe-{os.getpid()}")
    try:
        os.close(os.open(outside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        if error.errno != errno.EROFS:
            raise SetupError(f"writing outside the work dir failed with {error!r}, not EROFS") from None
    else:
        os.unlink(outside)
        raise SetupError("the file system outside the work dir is still writable")
    devices = [name for _, name in socket.if_nameindex() if name != "lo"]
    if devices:
        raise SetupError(f"network devices visible: {devices}")


# ------------------------------------------------------------------------------------ 2. limits


def set_limits(cpu_seconds: int, memory_bytes: int) -> None:
    """Hard CPU-time / address-space / file-size limits (soft = hard: the CPU limit ends in SIGKILL)."""
    for limit, value in (
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_FSIZE, 1 << 20),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


# ------------------------------------------------------------------------------------- 3. guard


def _refuse(name: str, what: str = ""):
    """A stand-in for ``name`` that raises instead of acting (``what``: the capability it stands for)."""
    message = f"{what or name} is disabled in the opdlm_trl evaluation sandbox" + (f" ({name})" if what else "")

    def disabled(*args, **kwargs):
        raise PermissionError(message)

    disabled.__name__ = name.rsplit(".", 1)[-1]
    return disabled


def _inside(path, workdir: str) -> bool:
    """True when ``path`` (symlinks resolved, relative to the current directory) lies in ``workdir``."""
    if isinstance(path, int):  # an already open descriptor: the open itself was checked
        return True
    resolved = os.path.realpath(os.fsdecode(os.fspath(path)))
    return resolved == workdir or resolved.startswith(workdir + os.sep)


def _confine(function, name: str, workdir: str, path_args: tuple[int, ...]):
    """``function`` restricted to paths inside ``workdir`` (``dir_fd`` forms refused: they escape the check)."""

    @functools.wraps(function)
    def confined(*args, **kwargs):
        if any(kwargs.get(key) is not None for key in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            raise PermissionError(f"{name} with dir_fd is disabled in the opdlm_trl evaluation sandbox")
        for index in path_args:
            if index < len(args) and not _inside(args[index], workdir):
                raise PermissionError(f"{name}({args[index]!r}): outside the opdlm_trl evaluation sandbox's work dir")
        return function(*args, **kwargs)

    return confined


def _confine_open(function, workdir: str, writes):
    """``open``-like ``function`` whose writing modes are restricted to paths inside ``workdir``."""

    @functools.wraps(function)
    def confined(file, *args, **kwargs):
        if writes(args, kwargs) and not _inside(file, workdir):
            raise PermissionError(f"writing {file!r} is disabled outside the opdlm_trl evaluation sandbox's work dir")
        return function(file, *args, **kwargs)

    return confined


def _mode_writes(args, kwargs) -> bool:
    mode = args[0] if args else kwargs.get("mode", "r")
    return isinstance(mode, str) and any(char in mode for char in "wax+")


def _flags_write(args, kwargs) -> bool:
    flags = args[0] if args else kwargs.get("flags", 0)
    return bool(flags & _WRITE_FLAGS)


_PATH_FUNCTIONS = {  # os function -> positions of its path arguments
    **dict.fromkeys(("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "truncate", "mkfifo"), (0,)),
    **dict.fromkeys(("chmod", "lchmod", "chown", "lchown", "utime", "mknod", "chdir"), (0,)),
    **dict.fromkeys(("rename", "renames", "replace", "link", "symlink"), (0, 1)),
}
_PROCESS_FUNCTIONS = (
    "system popen kill killpg fork forkpty execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle "
    "spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp setsid setpgid setuid setgid "
    "seteuid setegid setreuid setregid chroot fchdir putenv unsetenv pidfd_open"
).split()


def install_guard(workdir: str) -> None:
    """Replace the Python entry points to processes, signals, sockets, limits and outside writes."""
    import _posixsubprocess
    import _socket
    import shutil
    import signal
    import socket
    import subprocess

    for name in _PROCESS_FUNCTIONS:
        if hasattr(os, name):
            setattr(os, name, _refuse(f"os.{name}"))
    for name, positions in _PATH_FUNCTIONS.items():
        if hasattr(os, name):
            setattr(os, name, _confine(getattr(os, name), f"os.{name}", workdir, positions))
    os.open = _confine_open(os.open, workdir, _flags_write)
    builtins.open = io.open = _confine_open(io.open, workdir, _mode_writes)
    for module, names in (
        (subprocess, ("Popen", "call", "run", "check_call", "check_output", "getoutput", "getstatusoutput")),
        (_posixsubprocess, ("fork_exec",)),
        (shutil, ("rmtree", "move", "chown")),
        (signal, ("pthread_kill", "pidfd_send_signal")),
        (resource, ("setrlimit", "prlimit")),
        (socket, ("socket", "socketpair", "create_connection", "create_server", "fromfd")),
        (_socket, ("socket", "socketpair")),
        (builtins, ("exit", "quit")),
    ):
        what = "network access" if module in (socket, _socket) else ""
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _refuse(f"{module.__name__}.{name}", what))


# -------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    """Contain (optionally), limit, guard, then run ``PROGRAM`` as ``__main__``."""
    contain, cpu_seconds, memory_bytes, program = argv
    program = os.path.realpath(program)
    workdir = os.path.dirname(program)
    if contain == "1":
        try:
            read_only_view(workdir)
            drop_privileges()
            verify(workdir)
        except (SetupError, OSError) as error:
            print(f"{SETUP_MARKER}: {error}", file=sys.stderr, flush=True)
            os._exit(SETUP_FAILED)
    set_limits(int(cpu_seconds), int(memory_bytes))
    install_guard(workdir)
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
