"""One sealed-off place per submission for ``python -m course grade`` (see ``course.grade``).

Each submission runs from a private copy in a temporary folder of its own, under limits
(``resource.setrlimit``: memory, CPU time, file size; processes), and can write nothing outside
that folder. What the machine offers decides how (``detect``), and the grader prints it:

- ``user``: the grader runs as root and the interpreter, the package and the model cache are
  readable by others: every process of the submission runs as an unprivileged user of its own
  (``course-sandbox``, or ``course-sandbox-1``, ``-2``... when other sandboxes are open at the same
  time: each sandbox holds its user by a lock for its lifetime; created with ``useradd`` when
  missing), with its own HOME and TMPDIR, no new privileges, and is killed by user id afterwards
  (``kill(-1)`` as that user), so two graders side by side never end each other's processes; files
  it left in ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are removed.
- ``bwrap``: bubblewrap (the Debian package ``bubblewrap``) where user namespaces work: the whole
  file system is mounted read-only except the submission's folder (its HOME and TMPDIR), with a
  private ``/dev``, no network, and process ids of its own; when its first process ends, the kernel ends
  every process in the namespace (new sessions included), and the grader waits until none is left.
  The process limit uses a ``pids`` cgroup where one can be made (``RLIMIT_NPROC`` does not count
  for root's processes).
- ``off``: neither works: the grader says plainly that the sandbox is off.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

USER = "course-sandbox"
GIB = 1 << 30
_PIDS_V1 = Path("/sys/fs/cgroup/pids")
_PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG = 38, 1
SLOTS = 16  # sandboxes open at once in ``user`` mode, each with a user of its own
_LOCKS = Path("/run/lock/course-sandbox")


class SandboxError(RuntimeError):
    """A submission's processes could not be ended: grading stops (no result may be written)."""


@dataclass
class Limits:
    """Per submission: bytes of memory per process (``RLIMIT_DATA``: heap and private mappings),
    CPU seconds per process, processes, bytes per file written."""

    memory: int
    cpu: int
    processes: int = 512
    file_size: int = 4 * GIB

    @classmethod
    def for_timeout(cls, timeout: float) -> Limits:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(memory=max(4 * GIB, min(ram // 2, 64 * GIB)), cpu=int(timeout * (os.cpu_count() or 1)) + 300)

    def describe(self) -> str:
        return (f"memory {self.memory / GIB:.0f} GiB and CPU {self.cpu} s per process, {self.processes} processes, "
                f"files up to {self.file_size / GIB:.0f} GiB")

    def apply(self) -> None:
        for kind, value in ((resource.RLIMIT_DATA, self.memory), (resource.RLIMIT_CPU, self.cpu),
                            (resource.RLIMIT_FSIZE, self.file_size), (resource.RLIMIT_CORE, 0),
                            (resource.RLIMIT_NPROC, self.processes)):
            resource.setrlimit(kind, (value, value))


@dataclass
class Mode:
    """How submissions are sealed off: ``kind`` is ``user``, ``bwrap`` or ``off``; ``protections`` in words."""

    kind: str
    protections: list[str] = field(default_factory=list)
    uid: int | None = None
    gid: int | None = None

    def describe(self, limits: Limits) -> str:
        if self.kind == "off":
            return ("sandbox OFF: " + "; ".join(self.protections) + f". Only limits apply ({limits.describe()}); "
                    "a submission can write wherever the grader can.")
        return f"sandbox {self.kind}: " + "; ".join(self.protections) + f"; limits: {limits.describe()}"


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _sandbox_user(create: bool, name: str = USER) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if not create or shutil.which("useradd") is None:
            return None
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", name], capture_output=True)
        if done.returncode:
            return None
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _claim_user(mode: Mode):
    """A user no other open sandbox has: ``(uid, gid, lock)``; the lock (an open file) holds it until closed.

    Slot 0 is ``mode``'s own user; the others are ``course-sandbox-N``, created when first needed.
    When every slot is taken, wait for slot 0."""
    try:
        _LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder, prefix = _LOCKS, ""
    except OSError:
        folder, prefix = Path(tempfile.gettempdir()), "course-sandbox-slot-"
    for slot, wait in [*((slot, False) for slot in range(SLOTS)), (0, True)]:
        lock = open(folder / f"{prefix}{slot}.lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        ids = (mode.uid, mode.gid) if slot == 0 else _sandbox_user(create=True, name=f"{USER}-{slot}")
        if ids is not None:
            return (*ids, lock)
        lock.close()
    raise SandboxError(f"no user could be claimed for the sandbox (useradd {USER}-N failed?)")


def _probe(mode: Mode, package_root: Path) -> bool:
    """Whether the grader's interpreter can import the package and torch inside ``mode``."""
    box = Sandbox(mode, Limits.for_timeout(60))
    code = (f"import sys, importlib.util; sys.path.insert(0, {str(package_root)!r}); import course.grade_worker; "
            "assert importlib.util.find_spec('torch')")
    try:
        done = box.run([sys.executable, "-c", code], env=box.environment(dict(os.environ)), timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        box.close()
    return done.returncode == 0


@cache
def detect(package_root: str) -> Mode:
    """The strongest sandbox this machine offers for this grader (tried once per process)."""
    root, reasons = Path(package_root), []
    if os.geteuid() == 0:
        ids = _sandbox_user(create=True)
        if ids is None:
            reasons.append(f"no user {USER} and useradd failed")
        else:
            mode = Mode("user", [f"runs as the unprivileged user {USER} (uid {ids[0]}; {USER}-N for graders "
                                 "side by side), own HOME and TMPDIR, no new privileges",
                                 "killed by user id after each step"], *ids)
            if _probe(mode, root):
                return mode
            reasons.append(f"{USER} cannot read the interpreter {sys.executable}, the package or torch")
    else:
        reasons.append("not running as root")
    if shutil.which("bwrap"):
        mode = Mode("bwrap", ["bubblewrap: file system read-only except the submission's folder",
                              "private /dev, TMPDIR in its folder, no network, own process ids (all ended with the sandbox)"])
        if _probe(mode, root):
            if _pids_cgroup_possible():
                mode.protections.append("process count limited by a pids cgroup")
            else:
                mode.protections.append("process count NOT limited (no pids cgroup)")
            return mode
        reasons.append("bwrap is installed but does not work here (user namespaces disabled?)")
    else:
        reasons.append("bwrap is not installed (apt-get install bubblewrap)")
    return Mode("off", reasons)


def _pids_cgroup_possible() -> bool:
    return os.geteuid() == 0 and os.access(_PIDS_V1, os.W_OK)


class Sandbox:
    """One submission's folder (``work``: HOME, TMPDIR and cwd of its processes) and its processes.

    ``popen``/``run`` start a process inside; ``stop`` ends every process the submission started
    and returns only when none is left; ``close`` also removes the folder.
    """

    def __init__(self, mode: Mode, limits: Limits, parent: Path | None = None):
        self.mode, self.limits = mode, limits
        self.root = Path(tempfile.mkdtemp(prefix="course-grade-", dir=parent))
        self.root.chmod(0o711)  # the grader's files (specs) are readable inside, not listable
        self.work = self.root / "work"
        self._namespaces: dict[str, tuple[int, str]] = {}  # pid namespace -> its first process and start time
        self._cgroup = None
        self.uid, self.gid, self._lock = _claim_user(mode) if mode.kind == "user" else (None, None, None)
        if self.uid is not None:
            self.stop()  # whatever a crashed grader left running as this user
        for folder in (self.work, self.work / "home", self.work / "tmp"):
            folder.mkdir(mode=0o700)
            if mode.kind == "user":
                os.chown(folder, self.uid, self.gid)
        if mode.kind == "bwrap" and _pids_cgroup_possible():
            try:
                self._cgroup = _PIDS_V1 / self.root.name
                self._cgroup.mkdir()
                (self._cgroup / "pids.max").write_text(str(limits.processes))
            except OSError:
                self._cgroup = None

    def environment(self, base: dict) -> dict:
        home = self.work / "home"
        env = dict(base)
        env.update({"HOME": str(home), "TMPDIR": str(self.work / "tmp"), "USER": USER, "LOGNAME": USER,
                    "MPLCONFIGDIR": str(home / ".matplotlib"), "IPYTHONDIR": str(home / ".ipython"),
                    "JUPYTER_RUNTIME_DIR": str(home / ".jupyter-runtime"), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
                    "JUPYTER_DATA_DIR": str(home / ".jupyter-data"), "XDG_CACHE_HOME": str(home / ".cache"),
                    "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"})
        return env

    def _preexec(self):
        limits, mode, cgroup, uid, gid = self.limits, self.mode, self._cgroup, self.uid, self.gid

        def setup():  # in the child, before exec
            os.setsid()
            libc = _libc()
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            limits.apply()
            if mode.kind == "user":
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)

        return setup

    def _command(self, argv: list[str], info_fd: int | None) -> list[str]:
        if self.mode.kind != "bwrap":
            return argv
        work = str(self.work)
        return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", work, work, "--unshare-all", "--unshare-user", "--uid", "1000", "--gid", "1000",
                "--die-with-parent", "--new-session", "--chdir", work, "--info-fd", str(info_fd), *argv]

    def popen(self, argv: list[str], *, env: dict, pass_fds=(), **kwargs) -> subprocess.Popen:
        info_read = info_write = None
        if self.mode.kind == "bwrap":
            info_read, info_write = os.pipe()
            pass_fds = (*pass_fds, info_write)
        process = subprocess.Popen(self._command(argv, info_write), env=env, cwd=self.work, pass_fds=pass_fds,
                                   preexec_fn=self._preexec(), **kwargs)
        if info_read is not None:
            os.close(info_write)
            with os.fdopen(info_read, "rb") as info:
                self._note_namespace(info.read())
        return process

    def _note_namespace(self, data: bytes) -> None:
        try:
            child = json.loads(data.decode() or "{}").get("child-pid")
            if child:
                self._namespaces[os.readlink(f"/proc/{child}/ns/pid")] = (child, _start_time(child))
        except (ValueError, OSError):
            pass

    def _live_namespaces(self) -> set[str]:
        """The noted pid namespaces whose first process still runs. When that process ends, the kernel ends
        every other one in its namespace, and the namespace's number may then be given to another
        sandbox's (another grader's) processes: a dead one is forgotten, never searched again."""
        for namespace, (pid, started) in list(self._namespaces.items()):
            try:
                alive = _start_time(pid) == started and not _dead(pid)
            except OSError:
                alive = False
            if not alive:
                del self._namespaces[namespace]
        return set(self._namespaces)

    def run(self, argv: list[str], *, env: dict, timeout: float) -> subprocess.CompletedProcess:
        process = self.popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=timeout)
        finally:
            self.stop(process)
        return subprocess.CompletedProcess(argv, process.returncode)

    def stop(self, process: subprocess.Popen | None = None, deadline: float = 30.0) -> None:
        """End every process the submission started; return when none is left (else raise)."""
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
            process.wait()
        end = time.monotonic() + deadline
        while True:
            left = self._survivors()
            if not left:
                break
            if time.monotonic() > end:
                raise SandboxError(f"Processes {sorted(left)} of a submission could not be stopped.")
            if self.mode.kind == "user":
                _kill_as(self.uid)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)
        if self.mode.kind == "user":
            _sweep_shared_tmp(self.uid)

    def _survivors(self) -> set[int]:
        found = set()
        if self._cgroup is not None:
            found |= {int(p) for p in (self._cgroup / "cgroup.procs").read_text().split()}
        namespaces = set() if self._cgroup is not None else self._live_namespaces()  # a cgroup holds them all
        if self.mode.kind == "user" or namespaces:
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    if self.mode.kind == "user":
                        if _real_and_effective_uid(entry.name) & {self.uid}:
                            found.add(int(entry.name))
                    elif os.readlink(f"/proc/{entry.name}/ns/pid") in namespaces:
                        found.add(int(entry.name))
                except OSError:
                    pass
        return {pid for pid in found if not _dead(pid)}

    def close(self) -> None:
        self.stop()
        if self._cgroup is not None:
            try:
                self._cgroup.rmdir()
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # the user is free for the next sandbox
            self._lock = None


def _start_time(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat's 22nd field): with the pid, who it is."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[19]


def _dead(pid: int) -> bool:
    """A zombie (or gone): it runs no code; its parent reaps it when it gets round to it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def _real_and_effective_uid(pid: str) -> set[int]:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                return set(map(int, line.split()[1:3]))
    return set()


def _kill_as(uid: int) -> None:
    """``kill(-1, SIGKILL)`` as ``uid``: every process of that user, in one step, new sessions included."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _sweep_shared_tmp(uid: int) -> None:
    """Remove what ``uid`` left in the folders every user may write to."""
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(shared))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
