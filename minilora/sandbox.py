"""Operating-system isolation for model-written code: each process under bubblewrap, limited by cgroups.

`execution.py` decides what runs (the sample's process and the tests' process); this module decides where.
A sandboxed process is `bwrap ... python -I -c RUNNER ...` (bubblewrap, the tool Flatpak uses; see
`bwrap(1)`), with:
  - new user, PID, network, IPC, UTS, mount (and, where the kernel has it, cgroup) namespaces; uid and gid
    65534 inside; no capabilities; `--die-with-parent`; a new session. Run as root, bwrap itself is started
    as nobody, so that the sample is nobody outside as well (`sandbox_user`);
  - a root file system of its own, read-only (`--remount-ro /`): /usr and the /bin, /lib* links, two files
    of /etc (ld.so.cache, localtime) and this interpreter's install trees, nothing else of the host
    (no home directories, no /etc secrets, no project files, no /sys); a fresh /proc without /proc/sys,
    and a minimal /dev;
  - one writable place: a private tmpfs on /tmp of `Limits.file_mb`, also the working directory and HOME;
  - an empty environment (`--clearenv`, then PATH, HOME, LANG and one BLAS thread);
  - where this process may create cgroups (root on cgroup v1, or a delegated v2 subtree): a memory limit over
    all of the sandbox's processes together and a process-count limit (`pids.max`). The bwrap processes are
    placed in them while bwrap waits on `--block-fd`, before anything of the sample runs, so no child escapes
    the accounting. Without cgroups, only the runner's rlimits hold (per process: see `rlimit_gap`).
The wall-clock kill sends SIGKILL to the namespace's init (through a pidfd, so a recycled pid is never hit):
the kernel then kills every process of the PID namespace, including any that called setsid() or forked
away. The sample cannot see or signal the evaluator: it is not in its PID namespace.

Without bwrap, `execution` refuses to run samples unless the caller opts out (`allow_unsandboxed=True`,
`evaluate.py --unsafe-no-sandbox`); then processes run directly, in a temporary directory, with the runner's
rlimits only.
"""
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

log = logging.getLogger(__name__)

INSTALL_HINT = ("install bubblewrap: `sudo apt-get install -y bubblewrap` (Debian/Ubuntu), `sudo dnf install "
                "bubblewrap` (Fedora), `sudo pacman -S bubblewrap` (Arch); it needs user namespaces, which "
                "most distributions enable")
SANDBOX_UID = 65534  # nobody
_START_TIMEOUT_S = 10.0  # bwrap reports its child's pid within milliseconds; this only catches a hung start




@dataclass(frozen=True)
class Limits:
    """Per sample. Under bwrap with cgroups, memory and processes count a sandbox's processes together."""
    timeout_s: float = 5.0   # wall clock for the whole sample (its process and its tests' process)
    memory_mb: int = 1024    # per sandbox: cgroup memory limit; also RLIMIT_AS of each process
    file_mb: int = 16        # size of the writable tmpfs; RLIMIT_FSIZE; the stdout/stderr kept per process
    processes: int = 16      # per sandbox: cgroup pids.max; RLIMIT_NPROC


# ------------------------------------------------------------------------------------ file system

def interpreter():
    """The Python that samples run on: this one's base interpreter, symlinks resolved. A virtual environment's
    `python` is a link (or copy) inside the venv, which may lie under /tmp, where the sandbox mounts its own
    tmpfs; samples run isolated (`-I`) on the standard library alone, so the base install is all they need."""
    if sys.prefix != sys.base_prefix:  # inside a virtual environment
        return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return os.path.realpath(sys.executable)


def _python_trees():
    """Directories the interpreter needs: its install prefix and the directory of the executable."""
    trees = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    trees.add(os.path.dirname(interpreter()))
    kept = []
    for tree in sorted(trees):  # parents sort first: a tree inside one already bound adds nothing
        if not any(tree == k or tree.startswith(k + os.sep) for k in kept + ["/usr"]):
            kept.append(tree)
    return kept


def filesystem_args():
    """bwrap arguments for the sandbox's read-only root (module docstring)."""
    args = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        args += ["--ro-bind-try", path, path]
    for tree in _python_trees():
        args += ["--ro-bind", tree, tree]
    return args


def bwrap_command(limits, extra_fds=()):
    """The bwrap argument list up to (not including) the command; `extra_fds` are info/block fds."""
    info_fd, block_fd = extra_fds
    return [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--die-with-parent", "--new-session", "--hostname", "sandbox",
            *filesystem_args(), "--proc", "/proc", "--dev", "/dev",
            # sysctls: mapped to root outside (see sandbox_user), the sample could otherwise write them
            "--size", "4096", "--tmpfs", "/proc/sys", "--remount-ro", "/proc/sys",
            "--size", str(limits.file_mb << 20), "--perms", "1777", "--tmpfs", "/tmp",
            "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv",
            *[a for k, v in sandbox_env("/tmp").items() for a in ("--setenv", k, v)],
            "--info-fd", str(info_fd), "--block-fd", str(block_fd), "--"]


def sandbox_env(home):
    # one BLAS thread: `import numpy` on a many-core box would otherwise start a thread per core
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------- cgroups

def _own_cgroups():
    """{controller: this process's cgroup path} from /proc/self/cgroup ("" key: the v2 unified path)."""
    found = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    found[c] = path
    except OSError:
        pass
    return found


class Cgroups:
    """A parent cgroup per controller for this evaluator, one child per sandboxed process.

    cgroup v1: /sys/fs/cgroup/{memory,pids}/<our cgroup>/minilora-exec-<pid>/<n>. cgroup v2: the same under
    the unified tree, which works only where our cgroup may have children with controllers (delegation).
    Created below our own cgroup, so everything stays accounted to whatever limits us.
    """

    def __init__(self):
        self.parents, self.counter = {}, 0
        own = _own_cgroups()
        name = f"minilora-exec-{os.getpid()}"
        if "memory" in own and "pids" in own and os.path.isdir("/sys/fs/cgroup/memory"):
            for c in ("memory", "pids"):
                path = os.path.join("/sys/fs/cgroup", c, own[c].lstrip("/"), name)
                os.makedirs(path, exist_ok=True)
                self.parents[c] = path
            self.version = 1
        elif os.path.exists("/sys/fs/cgroup/cgroup.controllers") and "" in own:
            base = os.path.join("/sys/fs/cgroup", own[""].lstrip("/"))
            path = os.path.join(base, name)
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                f.write("+memory +pids")
            self.parents[""] = path
            self.version = 2
        else:
            raise OSError("no cgroup v1 memory/pids hierarchy and no cgroup v2 tree")
        for parent in self.parents.values():
            _remove_stale(os.path.dirname(parent))
        trial = self.create(64 << 20, 8)  # limits can really be set here (else: rlimits only)
        self.remove(trial)

    def create(self, memory_bytes, pids):
        """A new child cgroup (dict controller -> path) limited to `memory_bytes` and `pids` tasks."""
        self.counter += 1
        paths = {c: os.path.join(p, str(self.counter)) for c, p in self.parents.items()}
        for path in paths.values():
            os.makedirs(path, exist_ok=True)
        if self.version == 1:
            _write(paths["memory"], "memory.limit_in_bytes", memory_bytes)
            if os.path.exists(os.path.join(paths["memory"], "memory.memsw.limit_in_bytes")):
                _write(paths["memory"], "memory.memsw.limit_in_bytes", memory_bytes)  # no escape into swap
            _write(paths["pids"], "pids.max", pids)
        else:
            _write(paths[""], "memory.max", memory_bytes)
            _write(paths[""], "memory.swap.max", 0, missing_ok=True)
            _write(paths[""], "pids.max", pids)
        return paths

    @staticmethod
    def add(paths, pid):
        for path in paths.values():
            _write(path, "cgroup.procs", pid)

    @staticmethod
    def out_of_memory(paths):
        """Whether the kernel's OOM killer acted in this cgroup."""
        for c, path in paths.items():
            name = "memory.oom_control" if c == "memory" else "memory.events" if c == "" else None
            if name:
                try:
                    with open(os.path.join(path, name)) as f:
                        fields = dict(line.split() for line in f if line.strip())
                    return int(fields.get("oom_kill", 0)) > 0
                except (OSError, ValueError):
                    return False
        return False

    @staticmethod
    def remove(paths):
        for path in paths.values():
            _remove_cgroup(path)  # may still be emptying; the parent is removed at exit (best effort)

    def close(self):
        for parent in self.parents.values():
            _remove_cgroup_tree(parent)


def _remove_cgroup(path):
    for pid in _read_pids(path):  # normally none: the namespace is gone
        _kill(pid)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _remove_cgroup_tree(parent):
    """A parent cgroup and its children (a cgroup directory holds only control files besides them)."""
    if os.path.isdir(parent):
        for child in os.listdir(parent):
            if os.path.isdir(os.path.join(parent, child)):
                _remove_cgroup(os.path.join(parent, child))
    _remove_cgroup(parent)


def _remove_stale(directory):
    """Remove the cgroups of evaluators that were killed before they could clean up."""
    for name in os.listdir(directory):
        pid = name.removeprefix("minilora-exec-")
        if name.startswith("minilora-exec-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _remove_cgroup_tree(os.path.join(directory, name))


def _write(path, name, value, missing_ok=False):
    try:
        with open(os.path.join(path, name), "w") as f:
            f.write(str(value))
    except FileNotFoundError:
        if not missing_ok:
            raise


def _read_pids(path):
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@functools.lru_cache(maxsize=None)
def cgroups():
    """The evaluator's Cgroups, or None where cgroups cannot be created here (then rlimits only)."""
    try:
        groups = Cgroups()
    except OSError as e:
        log.info("sandbox: no cgroups (%s); memory and process limits are per-process rlimits", e)
        return None
    import atexit

    atexit.register(groups.close)
    return groups


# ------------------------------------------------------------------------------------ availability

def _trial(user):
    """(True, "") if bwrap, started as `user` (uid, gid) or as ourselves (None), runs this interpreter."""
    try:
        proc = SandboxedProcess([interpreter(), "-I", "-S", "-c", "pass"], Limits(), sandboxed=True, user=user,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        return False, f"bwrap could not start ({e})"
    try:
        _, err = proc.popen.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.popen.wait()
        return False, "bwrap did not finish a trial run within 30 s"
    finally:
        proc.release()
    if proc.popen.returncode != 0:
        return False, f"bwrap failed a trial run: {err.decode(errors='replace').strip()[-300:]}"
    return True, ""


@functools.lru_cache(maxsize=None)
def sandbox_user():
    """Who bwrap runs as: (65534, 65534) when we are root and `nobody` can run this interpreter, else None
    (ourselves). As root, bwrap started as root would map the sandbox's user to root outside: the kernel
    would then treat the sample as root for permission checks on everything it can see (the read-only
    mounts and the hidden /proc/sys still hold). Started as nobody, the sample is nobody outside too."""
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        return None
    ok, why = _trial((SANDBOX_UID, SANDBOX_UID))
    if not ok:
        log.warning("sandbox: bwrap cannot run this interpreter as nobody (%s; an interpreter under a private "
                    "home?): samples run as a user mapped to root outside. Use a system-wide Python to avoid it.", why)
        return None
    return SANDBOX_UID, SANDBOX_UID


@functools.lru_cache(maxsize=None)
def sandbox_status():
    """(True, "") if bwrap can start a sandboxed interpreter here, else (False, why). Tried once."""
    if shutil.which("bwrap") is None:
        return False, "bubblewrap (`bwrap`) is not installed"
    return _trial(sandbox_user())


def sandbox_available():
    """Whether samples can run under bubblewrap here (cheap after the first call)."""
    return sandbox_status()[0]


def rlimit_gap():
    """What holds without cgroups, for reports."""
    return ("memory is limited per process (RLIMIT_AS), not for all of a sample's processes together; the "
            "process count (RLIMIT_NPROC) does not bind a sandbox that maps to root outside")


# --------------------------------------------------------------------------------------- processes

class SandboxedProcess:
    """One process started under bwrap (or, opted out, directly), with the fds in `pass_fds` kept open.

    `command` runs inside; its working directory is the sandbox's /tmp (or a temporary directory).
    `kill()` ends it and everything it started. Call `release()` once it is reaped.
    """

    def __init__(self, command, limits, sandboxed, pass_fds=(), stdin=None, stdout=None, stderr=None, user="auto"):
        self.sandboxed, self.cgroup, self.pidfd, self.workdir = sandboxed, None, None, None
        if not sandboxed:
            self.workdir = tempfile.mkdtemp(prefix="minilora-exec-")
            self.popen = subprocess.Popen(command, cwd=self.workdir, env=sandbox_env(self.workdir), stdin=stdin,
                                          stdout=stdout, stderr=stderr, pass_fds=pass_fds, start_new_session=True)
            return
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        try:
            # bwrap itself gets no environment either: its init process (pid 1 inside) is readable from inside
            user = sandbox_user() if user == "auto" else user
            as_user = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
            self.popen = subprocess.Popen(bwrap_command(limits, (info_w, block_r)) + list(command), stdin=stdin,
                                          stdout=stdout, stderr=stderr, pass_fds=(*pass_fds, info_w, block_r),
                                          start_new_session=True, env={"PATH": os.defpath}, cwd="/", **as_user)
        finally:
            os.close(info_w)
            os.close(block_r)
        try:
            child = self._read_child_pid(info_r)
            if child is not None:
                try:  # bwrap's child waits on --block-fd, unless its set-up failed (then it is gone: no matter)
                    self.pidfd = os.pidfd_open(child)
                    groups = cgroups()
                    if groups is not None:  # + 2 tasks: bwrap outside and its init inside
                        self.cgroup = groups.create(limits.memory_mb << 20, limits.processes + 2)
                        for pid in (self.popen.pid, child):
                            groups.add(self.cgroup, pid)
                except ProcessLookupError:
                    pass
            try:
                os.write(block_w, b"1")  # go: from here on every process it starts is in the cgroup
            except BrokenPipeError:
                pass
        except BaseException:
            self.kill()
            self.popen.wait()
            self.release()
            raise
        finally:
            os.close(info_r)
            os.close(block_w)

    @staticmethod
    def _read_child_pid(fd):
        data = b""
        while select.select([fd], [], [], _START_TIMEOUT_S)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        try:
            return int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError):
            return None  # bwrap failed before its child started; its stderr says why

    def kill(self):
        """SIGKILL to the sandbox's PID namespace (all its processes), or to the process group."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.cgroup is not None:
            for path in self.cgroup.values():
                for pid in _read_pids(path):
                    _kill(pid)
        try:
            if self.sandboxed:
                self.popen.kill()
            else:
                os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def out_of_memory(self):
        return self.cgroup is not None and Cgroups.out_of_memory(self.cgroup)

    def release(self):
        """Close the pidfd, remove the cgroup and the temporary directory (after the process is reaped)."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.cgroup is not None:
            Cgroups.remove(self.cgroup)
            self.cgroup = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
