"""Child side of the pass@1 runner: contain this process, then run one model-written program.

Run as a script by :func:`opdlm_trl.eval.sandbox.run_program` (standard library only, so it works under
``python -I`` from any working directory)::

    python -I -B sandbox_guard.py CONTAIN CPU_SECONDS MEMORY_BYTES PROGRAM

In order, before the first line of ``PROGRAM`` runs:

1. ``CONTAIN=namespaces`` (the process was started by ``unshare`` in fresh user, mount, network, pid,
   IPC and UTS namespaces): every mount becomes read-only, ``nodev`` and ``nosuid`` except a bind mount
   of the work dir (the folder holding ``PROGRAM``), then every capability is dropped for good, so the
   program cannot undo the mounts. ``CONTAIN=landlock`` (no namespaces needed): a Landlock domain
   forbids writing outside the work dir, TCP and signals out (as far as the kernel's ABI goes).
   ``CONTAIN=none``: nothing. Any failure exits with :data:`SETUP_FAILED` and a ``SETUP_MARKER`` line
   (the parent then refuses to score, rather than scoring without the containment it asked for).
2. CPU-time, address-space, file-size and core-dump limits.
3. The in-process guard: spawning or signalling processes, the network, changing limits or the
   environment, and changing the file system outside the work dir raise :class:`PermissionError`.
   Its core is an audit hook (PEP 578), which sees the C functions themselves whatever Python name,
   module copy or reload reaches them; the few functions CPython does not audit are replaced in their
   C module (``posix``, ``_signal``, ...) and the modules that copied them, and pinned against reloads.
   Without namespaces it also refuses what gets past its checks (``ctypes``, ``cffi``, subinterpreters,
   Tcl, ``sqlite3``, ``readline``, ``_testcapi``, ...). It stops accidents and
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
import stat
import sys
import types

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

    _outside_is_read_only(workdir, errno.EROFS)
    devices = [name for _, name in socket.if_nameindex() if name != "lo"]
    if devices:
        raise SetupError(f"network devices visible: {devices}")


def _outside_is_read_only(workdir: str, expected: int) -> None:
    """Creating a file next to the work dir must fail with ``expected`` (the errno of the layer that stops it)."""
    outside = os.path.join(os.path.dirname(workdir), f".opdlm-sandbox-probe-{os.getpid()}")
    try:
        os.close(os.open(outside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        if error.errno != expected:
            expected_name = errno.errorcode[expected]
            raise SetupError(f"writing outside the work dir failed with {error!r}, not {expected_name}") from None
    else:
        os.unlink(outside)
        raise SetupError("the file system outside the work dir is still writable")


# ----------------------------------------------------------------------------------- 1b. Landlock
# <linux/landlock.h>: the same syscall numbers on every architecture.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION, _LANDLOCK_RULE_PATH_BENEATH = 1, 1
# Write rights per ABI version: WRITE_FILE, REMOVE_DIR/FILE, MAKE_CHAR/DIR/REG/SOCK/FIFO/BLOCK/SYM (1), REFER (2),
# TRUNCATE (3). Reading and executing stay allowed everywhere, as under the namespaces' read-only view.
_LANDLOCK_WRITES = {1: 0x1FF2, 2: 1 << 13, 3: 1 << 14}
_LANDLOCK_NET_TCP = 0b11  # ABI 4: BIND_TCP, CONNECT_TCP (no rule: both denied)
_LANDLOCK_SCOPES = 0b11  # ABI 6: ABSTRACT_UNIX_SOCKET, SIGNAL (nothing outside this process's domain)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none, e.g. disabled at boot or refused by a seccomp profile)."""
    try:
        return _libc_call("syscall", _LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    except SetupError:
        return 0


def restrict_with_landlock(workdir: str) -> int:
    """Forbid writing outside ``workdir`` (and, where the ABI has them, TCP and signals out) for good; the ABI.

    A Landlock domain needs no root and no namespaces, binds native code as well as Python, and survives
    ``execve``. It does not cover ``chmod`` / ``chown`` / ``utime`` / xattrs, UDP, or processes the program
    starts outliving the run.
    """
    import ctypes

    abi = landlock_abi()
    if abi < 1:
        raise SetupError("Landlock is not available (kernel without it, or the syscall is filtered)")
    writes = sum(rights for version, rights in _LANDLOCK_WRITES.items() if version <= abi)
    handled = [writes] + ([_LANDLOCK_NET_TCP] if abi >= 4 else []) + ([_LANDLOCK_SCOPES] if abi >= 6 else [])
    attributes = (ctypes.c_uint64 * len(handled))(*handled)

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    ruleset = _libc_call("syscall", _LANDLOCK_CREATE_RULESET, attributes, ctypes.sizeof(attributes), 0)
    folder = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = PathBeneath(writes, folder)
        _libc_call("syscall", _LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _libc_call("syscall", _LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(folder)
        os.close(ruleset)
    _outside_is_read_only(workdir, errno.EACCES)
    return abi


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


# Every function the guard runs while the program runs takes what it uses as default arguments, bound
# here: the program rebinding a builtin (``builtins.isinstance``), ``os.path`` or this module's names
# changes nothing, and changing the defaults or code of the hook's helpers is refused (``object.__setattr__``).


def _refuse(name: str, what: str = ""):
    """A stand-in for ``name`` that raises instead of acting (``what``: the capability it stands for).

    It keeps no reference to the function it replaces, so the original cannot be dug out of it.
    """
    message = f"{what or name} is disabled in the opdlm_trl evaluation sandbox" + (f" ({name})" if what else "")

    def disabled(*args, message=message, PermissionError=PermissionError, **kwargs):  # noqa: N803
        raise PermissionError(message)

    disabled.__name__ = name.rsplit(".", 1)[-1]
    return disabled


# Audit events (PEP 578): the C functions raise them whichever Python name, module copy or reload reached them.
_REFUSED_EVENTS = {  # event -> the capability it stands for
    **dict.fromkeys(
        ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty"), "starting a process"
    ),
    "subprocess.Popen": "starting a process",
    **dict.fromkeys(("os.kill", "os.killpg", "signal.pthread_kill"), "signalling a process"),
    **dict.fromkeys(("resource.setrlimit", "resource.prlimit"), "changing resource limits"),
    **dict.fromkeys(("os.putenv", "os.unsetenv"), "changing the environment"),
    "socket.__new__": "network access",
    **dict.fromkeys(("syslog.openlog", "syslog.syslog"), "writing to the system log"),
    **dict.fromkeys(("gc.get_objects", "gc.get_referrers", "gc.get_referents"), "reaching the guard's objects"),
}
_PATH_EVENTS = {  # event -> (positions of its paths, positions of its dir_fd arguments: -1 when not given)
    **dict.fromkeys(("os.remove", "os.rmdir"), ((0,), (1,))),
    "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)),
    **dict.fromkeys(("os.chown", "os.utime"), ((0,), (3,))),
    "os.truncate": ((0,), ()),
    "os.chdir": ((0,), ()),
    **dict.fromkeys(("os.rename", "os.link"), ((0, 1), (2, 3))),
    "os.symlink": ((0, 1), (2,)),
    **dict.fromkeys(("os.setxattr", "os.removexattr"), ((0,), ())),
}
# What gets past every check here: refused in runs without namespaces (under them, the namespaces hold).
_UNCHECKED_MODULES = (
    *("_ctypes", "_cffi_backend", "_testcapi", "_testinternalcapi"),  # C called directly
    *("_xxsubinterpreters", "_tkinter"),  # an interpreter without this hook; Tcl's exec and open
    *("_sqlite3", "readline", "_multiprocessing"),  # write files (ATTACH, history, /dev/shm semaphores) unaudited
)
_UNCHECKED_EVENTS = ("cpython.PyInterpreterState_New",)  # a subinterpreter, however created, lacks this hook

# Functions CPython raises no audit event for: replaced in the C module and in the module that copied them.
_UNAUDITED = {
    os.name: "setsid setpgid setuid setgid seteuid setegid setreuid setregid setresuid setresgid chroot pidfd_open "
    "setpriority sched_setaffinity sched_setscheduler sched_setparam mkfifo mknod memfd_create",
    "_posixsubprocess": "fork_exec",
    "_posixshmem": "shm_open shm_unlink",  # files in /dev/shm: memory outside the address-space limit
    "_signal": "pidfd_send_signal",
    "_socket": "socketpair",
}
_COPIED_INTO = {os.name: "os", "_signal": "signal", "_socket": "socket"}


def _exact_text(
    value,
    encoding=sys.getfilesystemencoding(),
    join=str.join,
    decode=bytes.decode,
    isinstance=isinstance,  # noqa: A002
    str=str,  # noqa: A002
    bytes=bytes,  # noqa: A002
):
    """``value`` as a plain ``str`` (``None`` when it is no text): a subclass cannot override what the checks call."""
    if isinstance(value, bytes):
        return decode(value, encoding, "surrogateescape")
    return join("", (value,)) if isinstance(value, str) else None


def _path_check(workdir: str):
    """``inside(path)``: True when ``path`` (symlinks resolved, relative to the working directory) lies in ``workdir``.

    A resolver of its own from C functions (``os.path.realpath`` is Python the program could rebind).
    A symlink loop or a path that is not text counts as outside.
    """

    def inside(
        path,
        workdir=workdir,
        text=_exact_text,
        lstat=os.lstat,
        readlink=os.readlink,
        getcwd=os.getcwd,
        is_link=stat.S_ISLNK,
        OSError=OSError,  # noqa: N803
    ) -> bool:
        path = text(path)
        if path is None:
            return False
        pending = (path if path.startswith("/") else getcwd() + "/" + path).split("/")[::-1]
        parts, hops = [], 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(name)
            current = "/" + "/".join(parts)
            try:
                link = is_link(lstat(current).st_mode)
                target = readlink(current) if link else ""
            except OSError:
                link = False
            if link:
                hops += 1
                if hops > 40:
                    return False
                parts.pop()
                if target.startswith("/"):
                    parts.clear()
                pending.extend(target.split("/")[::-1])
        resolved = "/" + "/".join(parts)
        return resolved == workdir or resolved.startswith(workdir + "/")

    return inside


def _is_directory(path, status=os.stat, is_dir=stat.S_ISDIR, OSError=OSError) -> bool:  # noqa: N803
    try:
        return is_dir(status(path).st_mode)
    except OSError:
        return False


def _audit_hook(workdir: str, native: bool, pinned: frozenset[str]):
    """The audit hook that checks each event; once added (``sys.addaudithook``) it cannot be removed.

    ``native``: False refuses loading :data:`_UNCHECKED_MODULES`, :data:`_UNCHECKED_EVENTS` and every
    ``ctypes`` event. ``pinned``: modules
    that must not be loaded afresh. Opening a directory for reading (or anything with ``O_PATH``) is
    refused: a directory descriptor passed as ``dir_fd`` would make a later relative path escape every
    path check here.
    """

    inside = _path_check(workdir)

    def hook(
        event,
        args,
        inside=inside,
        is_directory=_is_directory,
        helpers=frozenset(map(id, (inside, _is_directory, _exact_text))),  # reachable from a traceback's frame
        id=id,  # noqa: A002
        native=native,
        pinned=pinned,
        refused=types.MappingProxyType(dict(_REFUSED_EVENTS)),  # copies: this module's globals stay reachable
        path_events=types.MappingProxyType(dict(_PATH_EVENTS)),
        text=_exact_text,
        unchecked=frozenset(_UNCHECKED_MODULES),
        unchecked_events=frozenset(_UNCHECKED_EVENTS),
        write_flags=_WRITE_FLAGS,
        write_modes=frozenset("wax+"),
        directory_flag=getattr(os, "O_DIRECTORY", 0),
        path_flag=getattr(os, "O_PATH", 0),  # a descriptor that only names a file or directory
        access_flags=os.O_WRONLY | os.O_RDWR,  # no directory opens with these (O_TMPFILE: an unnamed file)
        isinstance=isinstance,  # noqa: A002
        int=int,  # noqa: A002
        PermissionError=PermissionError,  # noqa: N803
    ):
        if event in refused:
            raise PermissionError(f"{refused[event]} is disabled in the opdlm_trl evaluation sandbox ({event})")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):  # an open descriptor: its own open was checked
                return
            writes = flags & write_flags or not write_modes.isdisjoint(text(mode) or "")  # fopen() passes a mode
            if writes and not inside(path):
                raise PermissionError(
                    f"writing {path!r} is disabled outside the opdlm_trl evaluation sandbox's work dir"
                )
            if flags & path_flag or (not flags & access_flags and (flags & directory_flag or is_directory(path))):
                raise PermissionError(
                    f"opening the directory {path!r} is disabled in the opdlm_trl evaluation sandbox"
                )
        elif event in path_events:
            paths, dir_fds = path_events[event]
            for index in dir_fds:
                if args[index] not in (-1, None):
                    raise PermissionError(f"{event} with dir_fd is disabled in the opdlm_trl evaluation sandbox")
            for index in paths:
                if isinstance(args[index], int) or not inside(args[index]):  # a descriptor may point anywhere
                    raise PermissionError(
                        f"{event}({args[index]!r}): outside the opdlm_trl evaluation sandbox's work dir"
                    )
        elif event == "object.__setattr__" and id(args[0]) in helpers:
            raise PermissionError(f"changing the guard's {args[1]} is disabled in the opdlm_trl evaluation sandbox")
        elif event == "import" and text(args[0]) in pinned:
            raise PermissionError(f"importing {args[0]} afresh is disabled in the opdlm_trl evaluation sandbox")
        elif not native and (
            event.startswith("ctypes.")
            or event in unchecked_events
            or (event == "import" and text(args[0]) in unchecked)
        ):
            raise PermissionError(f"{event}{args[:1]!r} gets past the sandbox's checks: disabled without namespaces")

    return hook


def _replace_unaudited() -> frozenset[str]:
    """Replace the unaudited functions in every module that holds them; the names of those modules."""
    import _posixshmem  # noqa: F401  (loaded now: later loads are refused)
    import _posixsubprocess  # noqa: F401
    import _socket  # noqa: F401
    import signal  # noqa: F401
    import socket  # noqa: F401

    for backend, names in _UNAUDITED.items():
        holders = [sys.modules[backend], sys.modules.get(_COPIED_INTO.get(backend, ""))]
        for name in names.split():
            for module in filter(None, holders):
                if hasattr(module, name):
                    setattr(module, name, _refuse(f"{module.__name__}.{name}"))
    for name in ("exit", "quit"):
        setattr(builtins, name, _refuse(f"builtins.{name}"))
    return frozenset(_UNAUDITED) | frozenset(_COPIED_INTO.values())


def _pin_modules(pinned: frozenset[str]) -> None:
    """Make a fresh copy of a module the guard changed unreachable, so no reload or re-import restores its functions.

    A C module created afresh (``del sys.modules["posix"]; import posix``, ``importlib.import_module``)
    would carry the original functions again. Built-in modules are all created now and
    ``_imp.create_builtin`` hands back those (so it keeps no original to dig out); a fresh extension
    module raises an ``import`` event, refused by the hook for ``pinned`` names; ``importlib.reload`` of
    a pinned module is refused (a Python module re-run would copy the replaced functions anyway).
    """
    import _imp
    import importlib

    builtin_modules = types.MappingProxyType(
        {name: importlib.import_module(name) for name in sys.builtin_module_names}
    )

    def create_builtin(spec, modules=builtin_modules, ImportError=ImportError):  # noqa: N803
        if spec.name not in modules:
            raise ImportError(f"no built-in module named {spec.name}", name=spec.name)
        return modules[spec.name]

    def reload(module, pinned=pinned, reload=importlib.reload, PermissionError=PermissionError):  # noqa: N803
        if getattr(module, "__name__", None) in pinned:
            raise PermissionError(f"reloading {module.__name__} is disabled in the opdlm_trl evaluation sandbox")
        return reload(module)

    _imp.create_builtin, importlib.reload = create_builtin, reload


def install_guard(workdir: str, native: bool = True) -> None:
    """Guard processes, signals, sockets, limits and writes outside ``workdir`` (``native``: see :func:`_audit_hook`).

    The audit hook holds at the C level, whichever name, copy or reload of a module the program reaches a
    function through; the few functions CPython does not audit are replaced in their C module and the
    module that copied them, and those modules are pinned against reloads and re-imports.
    """
    pinned = _replace_unaudited()
    _pin_modules(pinned)
    sys.addaudithook(_audit_hook(workdir, native, pinned))


# -------------------------------------------------------------------------------------- main


LAYERS = ("namespaces", "landlock", "none")  # the kernel layer under the guard (CONTAIN on the command line)
_LANDLOCK_APPLIED = "landlock-applied"  # the same script again, started afresh inside the Landlock domain


def _contain(layer: str, workdir: str) -> None:
    """Set up ``layer`` (step 1); any failure ends the process with :data:`SETUP_FAILED` and the marker."""
    try:
        if layer == "namespaces":
            read_only_view(workdir)
            drop_privileges()
            verify(workdir)
        elif layer == "landlock":
            restrict_with_landlock(workdir)
    except (SetupError, OSError) as error:
        print(f"{SETUP_MARKER}: {error}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)


def main(argv: list[str]) -> None:
    """Contain (optionally), limit, guard, then run ``PROGRAM`` as ``__main__``.

    After Landlock the script starts itself afresh (the domain survives ``execve``), so the program does
    not find the ``ctypes`` the set-up needed already loaded: guard-only runs refuse loading it.
    """
    layer, cpu_seconds, memory_bytes, program = argv
    if layer not in (*LAYERS, _LANDLOCK_APPLIED):
        raise SystemExit(f"CONTAIN must be one of {LAYERS}, got {layer!r}")
    program = os.path.realpath(program)
    workdir = os.path.dirname(program)
    _contain(layer, workdir)
    if layer == "landlock":
        os.execv(sys.executable, [sys.executable, "-I", "-B", __file__, _LANDLOCK_APPLIED, *argv[1:3], program])
    set_limits(int(cpu_seconds), int(memory_bytes))
    install_guard(workdir, native=layer == "namespaces")
    sys.argv = [program]
    runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
