"""The ``mop-torchrl`` console script as a user runs it, for the tests that check what it prints.

Every :func:`cli` call is a new process that runs the installed console script
(``.venv/bin/mop-torchrl``) as ``__main__`` with its own stdin, stdout, stderr, argv, working
directory, environment and exit code. Starting a Python that imports torch costs ~5 s of CPU,
which the suite paid again for each of its ~60 calls; so a call is a child *forked* from a warm
interpreter: a fresh interpreter of the same executable, started once per environment and kept
for the session, with the script's ``sys.path``, that has only imported :data:`PRELOAD` (what
``train``, ``eval`` and ``demos`` import anyway). The child runs the script file the way the
interpreter does: exit code from ``SystemExit``, a traceback and exit 1 for any other exception,
then non-daemon threads joined and ``atexit`` handlers run (multiprocessing's included).
Anything the warm interpreter printed while importing would have been printed by a fresh process
too: if there is any, or it has started a thread, the helper starts real processes instead, so
no output can be hidden.

:func:`start` starts one without waiting (the signal and lock tests: a child in a session of
its own, signalled and polled like a :class:`subprocess.Popen`). ``MOP_TEST_FRESH_PROCESSES=1``
makes every call start a fresh interpreter instead (the same results, minutes slower);
``test_console_helper.py`` checks that both ways print and exit the same.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = str(Path(sys.executable).parent / "mop-torchrl")
QUIET = {**os.environ, "TQDM_DISABLE": "1", "RAY_local_fs_capacity_threshold": "1"}
"""An environment without the progress bar: stderr then holds only what the run prints.

Ray's raylet warns on the console every 10 s once a disk's free space falls under 5% of its
size, and it reaches the driver's stderr; on a thin-provisioned CI disk that is 13 GB free of
252 GB. Threshold 1 keeps the warning for a disk that is actually full.
"""

PRELOAD = (
    "mop_torchrl.cli",
    "mop_torchrl.train",
    "mop_torchrl.train.evaluate",
    "mop_torchrl.babyai.demos",
)
"""What the warm interpreter imports: torch, tensordict, torchrl, gymnasium and minigrid through
them (what ``train``, ``eval`` and ``demos`` import anyway; ``routes`` imports pandas and
matplotlib itself)."""

_WARM = r"""
import atexit, importlib, json, os, select, sys, threading

script, requests_fd, replies_fd, *preload = sys.argv[1:]
sys.path[0] = os.path.dirname(script)  # as when the script runs: its folder first
for name in preload:
    importlib.import_module(name)
sys.stdout.flush()
sys.stderr.flush()


def exit_code(code):
    # as the interpreter turns SystemExit into an exit status
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run(request):
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["stderr"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        new = os.open(path, flags, 0o600)
        os.dup2(new, fd)
        os.close(new)
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "multiprocessing.process" in sys.modules:  # the directory the process started in
        sys.modules["multiprocessing.process"].ORIGINAL_DIR = os.getcwd()
    sys.argv = [script, *request["args"]]
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_code(exit_.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = 120
    return code


def serve(requests_fd, replies):
    # a child per request line; replies with its pid, then with its exit status
    children, pending = {}, b""
    while True:
        ready, _, _ = select.select([requests_fd], [], [], 0.02 if children else None)
        if ready:
            chunk = os.read(requests_fd, 65536)
            if not chunk:
                return
            pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    os.close(requests_fd)
                    os.close(replies.fileno())
                    code = run(request)
                finally:
                    os._exit(code)
            children[pid] = request["id"]
            replies.write(json.dumps({"id": request["id"], "pid": pid}) + "\n")
            replies.flush()
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            replies.write(json.dumps({"id": children.pop(pid), "returncode": code}) + "\n")
            replies.flush()


with os.fdopen(int(replies_fd), "w") as replies:
    replies.write(json.dumps({"threads": threading.active_count()}) + "\n")
    replies.flush()
    serve(int(requests_fd), replies)
"""


class _Warm:
    """One warm interpreter for one environment: it forks a child per command."""

    def __init__(self, env: dict[str, str]) -> None:
        requests_r, self._requests = os.pipe()
        self._replies, replies_w = os.pipe()
        self.dir = tempfile.TemporaryDirectory(prefix="mop-console-")
        import_output = Path(self.dir.name) / "import-output"
        with open(import_output, "wb") as output:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WARM, SCRIPT, str(requests_r), str(replies_w), *PRELOAD],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                env=env,
                pass_fds=(requests_r, replies_w),
            )
        os.close(requests_r)
        os.close(replies_w)
        self._buffer = b""
        self._children: dict[int, dict] = {}
        ready = self._read(timeout=600)
        # Fork safely: no Python thread besides the main one, and nothing printed while
        # importing (a fresh process would have printed it: the caller must see it).
        self.usable = (
            ready is not None and ready["threads"] == 1 and not import_output.stat().st_size
        )

    def _read(self, timeout: float | None) -> dict | None:
        """The next reply line, or None after ``timeout`` seconds."""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._replies, 65536)
            if not chunk:
                raise RuntimeError(f"the warm interpreter ended: {self.proc.wait()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def reply(self, child: int, key: str, timeout: float | None) -> Any:
        """``key`` ("pid" or "returncode") of ``child``, or None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while key not in self._children[child]:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            reply = self._read(left)
            if reply is None:
                return None
            self._children[reply.pop("id")].update(reply)
        return self._children[child][key]

    def start(self, args: list[str], env: dict[str, str], new_session: bool, stdout: bool,
              stderr: bool) -> Started:  # fmt: skip
        child = len(self._children)
        self._children[child] = {}
        out = Path(self.dir.name) / f"{child}.stdout" if stdout else None
        err = Path(self.dir.name) / f"{child}.stderr" if stderr else None
        request = {
            "id": child,
            "args": args,
            "env": env,
            "cwd": os.getcwd(),
            "new_session": new_session,
            "stdout": out and str(out),
            "stderr": err and str(err),
        }
        os.write(self._requests, (json.dumps(request) + "\n").encode())
        pid = self.reply(child, "pid", timeout=60)
        if pid is None:
            raise RuntimeError(f"the warm interpreter did not fork: {self.proc.poll()}")
        return Started(self, child, pid, [SCRIPT, *args], out, err)

    def close(self) -> None:
        os.close(self._requests)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._replies)
        self.dir.cleanup()


class Started:
    """A console script started by :func:`start` from a warm interpreter: the parts of
    :class:`subprocess.Popen` the tests use (``pid``, ``returncode``, ``poll``, ``wait``,
    ``communicate``, ``send_signal``, ``kill``), with text output."""

    def __init__(self, warm: _Warm, child: int, pid: int, args: list[str],
                 stdout: Path | None, stderr: Path | None) -> None:  # fmt: skip
        self._warm, self._child, self.pid, self.args = warm, child, pid, args
        self._stdout, self._stderr = stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._warm.reply(self._child, "returncode", timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._warm.reply(self._child, "returncode", timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired as err:
            err.output, err.stderr = self._output()
            raise
        return self._output()

    def _output(self) -> tuple[str | None, str | None]:
        return tuple(None if path is None else _text(path) for path in (self._stdout, self._stderr))

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _text(path: Path) -> str:
    """What ``subprocess.run(..., text=True)`` makes of the bytes written to ``path``."""
    data = path.read_bytes() if path.exists() else b""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


_warm: dict[frozenset, _Warm | None] = {}

_SET_PER_TEST = ("PYTEST_CURRENT_TEST",)
"""Variables that change from test to test and that no import reads (pytest names the running
test): a child gets the exact environment of its call, a warm interpreter serves every value."""


def _warm_for(env: dict[str, str]) -> _Warm | None:
    env = {k: v for k, v in env.items() if k not in _SET_PER_TEST}
    key = frozenset(env.items())
    if key not in _warm:
        warm = _Warm(env)
        if not warm.usable:
            warm.close()
            warm = None
        _warm[key] = warm
    return _warm[key]


@atexit.register
def _close_warm() -> None:
    for warm in _warm.values():
        if warm is not None:
            warm.close()
    _warm.clear()


def start(
    *args: object,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    stdout: bool = False,
    stderr: bool = True,
) -> Started | subprocess.Popen:
    """Starts ``mop-torchrl *args`` in a new process (in ``env``, by default this process's
    environment; with ``new_session``, in a session of its own, as ``start_new_session``)
    capturing its stdout and stderr as text where asked to, else discarding them."""
    argv = list(map(str, args))
    env = dict(os.environ if env is None else env)
    warm = None if os.environ.get("MOP_TEST_FRESH_PROCESSES") == "1" else _warm_for(env)
    if warm is None:
        return subprocess.Popen(
            [SCRIPT, *argv],
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=new_session,
        )
    return warm.start(argv, env, new_session, stdout, stderr)


def cli(
    *args: object, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs ``mop-torchrl *args`` to the end in a new process (in ``env``, by default this
    process's environment), capturing its output as text."""
    proc = start(*args, env=env, stdout=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, match: str, code: int = 1) -> str:
    """The run failed with ``code`` and one stderr line ``mop-torchrl ...`` holding ``match``."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert lines[0].startswith("mop-torchrl ") and match in lines[0], lines[0]
    return lines[0]
