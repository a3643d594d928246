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

``MOP_TEST_FRESH_PROCESSES=1`` makes every call start a fresh interpreter instead (the same
results, minutes slower); the tests that signal a run or hold its lock (``test_signals.py``,
``test_lock_diskfull.py``) always start the real script with :class:`subprocess.Popen`, and
``test_console_helper.py`` checks that both ways print the same.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "mop-torchrl")
QUIET = {**os.environ, "TQDM_DISABLE": "1"}
"""An environment without the progress bar: stderr then holds only what the run prints."""

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
import atexit, importlib, json, os, sys, threading

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
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        new = os.open(path, flags, 0o600)
        os.dup2(new, fd)
        os.close(new)
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


tasks = os.listdir("/proc/self/task")
with os.fdopen(int(requests_fd)) as requests, os.fdopen(int(replies_fd), "w") as replies:
    replies.write(json.dumps({"threads": threading.active_count(), "tasks": len(tasks)}) + "\n")
    replies.flush()
    for line in requests:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                requests.close()
                os.close(int(replies_fd))
                code = run(json.loads(line))
            finally:
                os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()
"""


class _Warm:
    """One warm interpreter for one environment: ``run`` forks a child per command."""

    def __init__(self, env: dict[str, str]) -> None:
        requests_r, self._requests = os.pipe()
        self._replies, replies_w = os.pipe()
        self._dir = tempfile.TemporaryDirectory(prefix="mop-console-")
        self._import_output = Path(self._dir.name) / "import-output"
        with open(self._import_output, "wb") as output:
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
        ready = self._reply(timeout=600)
        printed = self._import_output.read_bytes()
        # Fork safely: no Python thread besides the main one, and nothing printed while
        # importing (a fresh process would have printed it: the caller must see it).
        self.usable = ready is not None and ready["threads"] == 1 and not printed
        self._calls = 0

    def _reply(self, timeout: float | None) -> dict | None:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._replies, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(
        self, args: list[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        self._calls += 1
        out = Path(self._dir.name) / f"{self._calls}.stdout"
        err = Path(self._dir.name) / f"{self._calls}.stderr"
        request = {
            "args": args,
            "env": env,
            "cwd": os.getcwd(),
            "stdout": str(out),
            "stderr": str(err),
        }
        os.write(self._requests, (json.dumps(request) + "\n").encode())
        pid = self._reply(timeout=60)
        if pid is None:
            raise RuntimeError(f"the warm interpreter did not fork: {self.proc.poll()}")
        done = self._reply(timeout=timeout)
        if done is None:
            os.kill(pid["pid"], 9)
            self._reply(timeout=60)
            raise subprocess.TimeoutExpired([SCRIPT, *args], timeout, _text(out), _text(err))
        return subprocess.CompletedProcess(
            [SCRIPT, *args], done["returncode"], _text(out), _text(err)
        )

    def close(self) -> None:
        os.close(self._requests)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._replies)
        self._dir.cleanup()


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


def cli(
    *args: object, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs ``mop-torchrl *args`` to the end in a new process (in ``env``, by default this
    process's environment), capturing its output as text."""
    argv = list(map(str, args))
    env = dict(os.environ if env is None else env)
    warm = None if os.environ.get("MOP_TEST_FRESH_PROCESSES") == "1" else _warm_for(env)
    if warm is None:
        return subprocess.run(
            [SCRIPT, *argv], capture_output=True, text=True, timeout=timeout, env=env
        )
    return warm.run(argv, env, timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, match: str, code: int = 1) -> str:
    """The run failed with ``code`` and one stderr line ``mop-torchrl ...`` holding ``match``."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert lines[0].startswith("mop-torchrl ") and match in lines[0], lines[0]
    return lines[0]
