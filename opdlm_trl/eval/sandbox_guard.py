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
3. The in-process guard: spawning or signalling processes, the network, changing limits or the
   environment, and changing the file system outside the work dir raise :class:`PermissionError`.
   Its core is an audit hook (PEP 578), which sees the C functions themselves whatever Python name,
   module copy or reload reaches them; the few functions CPython does not audit are replaced in their
   C module (``posix``, ``_signal``, ...) and the modules that copied them, and pinned against reloads.
   With ``CONTAIN=0`` it also refuses native bridges (``ctypes``, ``cffi``). It stops accidents and
   one-line escapes, not attackers (native code and tampering with the interpreter get past any
   in-process check): the namespaces of step 1 are what hold against a program that bypasses it, which
   is why the parent runs guard-only only when the caller asked for it by name.
"""

from __future__ import annotations

import builtins
import errno
import functools
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
    import ctypes  # here, not at the top: a guard-only run must not have loaded it for the program

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
    import ctypes

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
    """A stand-in for ``name`` that raises instead of acting (``what``: the capability it stands for).

    It keeps no reference to the function it replaces, so the original cannot be dug out of it.
    """
    message = f"{what or name} is disabled in the opdlm_trl evaluation sandbox" + (f" ({name})" if what else "")

    def disabled(*args, **kwargs):
        raise PermissionError(message)

    disabled.__name__ = name.rsplit(".", 1)[-1]
    return disabled


def _inside(path, workdir: str, resolve=os.path.realpath, fspath=os.fspath, fsdecode=os.fsdecode) -> bool:
    """True when ``path`` (symlinks resolved, relative to the current directory) lies in ``workdir``.

    The functions it uses are bound when this module loads: the program rebinding ``os.path.realpath``
    does not change the check.
    """
    resolved = resolve(fsdecode(fspath(path)))
    return resolved == workdir or resolved.startswith(workdir + os.sep)


def _refuse_dir_fd(function, name: str):
    """``function`` without its ``dir_fd`` forms: a path relative to a descriptor escapes every path check."""

    def confined(*args, **kwargs):
        if any(kwargs.get(key) is not None for key in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            raise PermissionError(f"{name} with dir_fd is disabled in the opdlm_trl evaluation sandbox")
        return function(*args, **kwargs)

    confined.__name__, confined.__doc__ = function.__name__, function.__doc__
    return confined


# Audit events (PEP 578) the C implementation raises whichever Python name, module copy or reload reaches it.
_REFUSED_EVENTS = {  # event -> the capability it stands for
    **dict.fromkeys(
        ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty"), "starting a process"
    ),
    "subprocess.Popen": "starting a process",
    **dict.fromkeys(("os.kill", "os.killpg", "signal.pthread_kill"), "signalling a process"),
    **dict.fromkeys(("resource.setrlimit", "resource.prlimit"), "changing resource limits"),
    **dict.fromkeys(("os.putenv", "os.unsetenv"), "changing the environment"),
    "socket.__new__": "network access",
}
_PATH_EVENTS = {  # event -> (positions of its paths, positions of its dir_fd arguments, -1 when not given)
    **dict.fromkeys(("os.remove", "os.rmdir"), ((0,), (1,))),
    "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)),
    **dict.fromkeys(("os.chown", "os.utime"), ((0,), (3,))),
    "os.truncate": ((0,), ()),
    "os.chdir": ((0,), ()),
    **dict.fromkeys(("os.rename", "os.link"), ((0, 1), (2, 3))),
    "os.symlink": ((0, 1), (2,)),
}
# Loading these lets a program call C directly, past every check here (guard-only runs refuse them).
_NATIVE_BRIDGES = ("_ctypes", "_cffi_backend")

# Functions CPython raises no audit event for: replaced in the Python module and in the C module behind it.
_UNAUDITED = {
    os.name: "setsid setpgid setuid setgid seteuid setegid setreuid setregid setresuid setresgid chroot pidfd_open",
    "_posixsubprocess": "fork_exec",
    "_signal": "pidfd_send_signal",
    "_socket": "socketpair",
}
_WRAPPERS = {"os": os.name, "subprocess": "_posixsubprocess", "signal": "_signal", "socket": "_socket"}
_DIR_FD_FUNCTIONS = ("open", "mkfifo", "mknod")  # write without an audited path check: no dir_fd forms
_CONFINED_PATHS = ("mkfifo", "mknod")


def _audit_hook(workdir: str, native: bool, inside=_inside, write_flags=_WRITE_FLAGS):
    """The audit hook that checks each event; it cannot be removed once added (``sys.addaudithook``).

    Its helpers are bound as defaults, so rebinding this module's names from the program changes nothing.
    ``native``: False refuses loading :data:`_NATIVE_BRIDGES` and every ``ctypes`` event.
    """
    refused, path_events, bridges = dict(_REFUSED_EVENTS), dict(_PATH_EVENTS), frozenset(_NATIVE_BRIDGES)

    def outside(path) -> bool:
        return not isinstance(path, int) and not inside(path, workdir)

    def hook(event: str, args: tuple) -> None:
        if event in refused:
            raise PermissionError(f"{refused[event]} is disabled in the opdlm_trl evaluation sandbox ({event})")
        if event == "open":
            path, _, flags = args
            if flags & write_flags and outside(path):
                raise PermissionError(
                    f"writing {path!r} is disabled outside the opdlm_trl evaluation sandbox's work dir"
                )
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if any(args[index] not in (-1, None) for index in dir_fds):
                raise PermissionError(f"{event} with dir_fd is disabled in the opdlm_trl evaluation sandbox")
            for index in paths:
                if isinstance(args[index], int) or outside(args[index]):  # a descriptor may point anywhere
                    raise PermissionError(
                        f"{event}({args[index]!r}): outside the opdlm_trl evaluation sandbox's work dir"
                    )
        elif not native and (event.startswith("ctypes.") or (event == "import" and args[0] in bridges)):
            raise PermissionError(f"native code ({event}{args[:1]!r}) is disabled in guard-only runs of the sandbox")

    return hook


def _replace_unaudited(workdir: str) -> None:
    """Replace the unaudited functions in every module that holds them (``os`` copied them from ``posix``)."""
    import _posixsubprocess  # noqa: F401  (imported so that it is pinned below)
    import _socket  # noqa: F401
    import signal  # noqa: F401
    import socket  # noqa: F401
    import subprocess  # noqa: F401

    for backend, names in _UNAUDITED.items():
        holders = [sys.modules[backend]] + [sys.modules[py] for py, c in _WRAPPERS.items() if c == backend]
        for name in names.split():
            for module in holders:
                if hasattr(module, name):
                    setattr(module, name, _refuse(f"{module.__name__}.{name}"))
    for name in _DIR_FD_FUNCTIONS:
        function = getattr(os, name)
        if name in _CONFINED_PATHS:
            function = _confine_path(function, f"os.{name}", workdir)
        replacement = _refuse_dir_fd(function, f"os.{name}")
        setattr(os, name, replacement)
        setattr(sys.modules[os.name], name, replacement)
    for name in ("exit", "quit"):
        setattr(builtins, name, _refuse(f"builtins.{name}"))


def _confine_path(function, name: str, workdir: str):
    """``function`` restricted to a first (path) argument inside ``workdir``."""

    def confined(path, *args, **kwargs):
        if not _inside(path, workdir):
            raise PermissionError(f"{name}({path!r}): outside the opdlm_trl evaluation sandbox's work dir")
        return function(path, *args, **kwargs)

    return confined


def _pin_modules() -> None:
    """Make reloading or re-importing a guarded module hand back the guarded one, never a fresh copy.

    A C module created afresh (``del sys.modules["posix"]; import posix``, ``importlib.import_module``)
    would carry the original functions again; ``importlib.reload`` re-runs a Python module's source.
    """
    import _imp
    import importlib

    guarded = {name: sys.modules[name] for name in (*_UNAUDITED, *_WRAPPERS)}
    create_builtin, create_dynamic = _imp.create_builtin, _imp.create_dynamic

    def pinned_builtin(spec):
        return guarded.get(spec.name) or create_builtin(spec)

    def pinned_dynamic(spec, file=None):
        return guarded.get(spec.name) or create_dynamic(spec, file)

    _imp.create_builtin, _imp.create_dynamic = pinned_builtin, pinned_dynamic
    reload = importlib.reload

    def guarded_reload(module):
        if getattr(module, "__name__", None) in guarded:
            raise PermissionError(f"reloading {module.__name__} is disabled in the opdlm_trl evaluation sandbox")
        return reload(module)

    importlib.reload = guarded_reload


def install_guard(workdir: str, native: bool = True) -> None:
    """Guard processes, signals, sockets, limits and writes outside ``workdir`` (``native``: see :func:`_audit_hook`).

    The audit hook holds at the C level, whichever name, copy or reload of a module the program reaches a
    function through; the few functions CPython does not audit are replaced in the C module itself and
    the modules that copied them, and pinned against reloads.
    """
    _replace_unaudited(workdir)
    _pin_modules()
    sys.addaudithook(_audit_hook(workdir, native))


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
    install_guard(workdir, native=contain == "1")
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
