"""The adversarial agent: run inside an agent's container (its source is the
task's payload), it tries the escapes a resourceful agent would try and
reports, per named probe, whether it was blocked and what it saw.

It looks for canaries by a prefix assembled at run time, so this source
itself (which arrives on stdin) never contains one. Standard library only."""

import ctypes
import ctypes.util
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

CANARY = "fleet" + "canary-"
CONTRACT_ENV = {"HOME", "PATH", "FLEET_TASK_ID", "FLEET_ATTEMPT", "FLEET_AGENT", "FLEET_TOKEN_DIR"}
SKIP_DIRS = ("/proc", "/sys", "/dev")
PAYLOAD = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
RESULTS = {}


def probe(name):
    def register(function):
        try:
            blocked, detail = function()
        except Exception as error:  # a probe that crashes proves nothing either way
            blocked, detail = False, f"probe error: {type(error).__name__}: {error}"
        RESULTS[name] = {"blocked": bool(blocked), "detail": str(detail)[:300]}
        return function
    return register


def read(path, limit=1024 * 1024):
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def canary_in(data):
    return data is not None and CANARY.encode() in data


def walk_files(top="/"):
    for root, dirs, files in os.walk(top):
        if root.startswith(SKIP_DIRS):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not os.path.join(root, d).startswith(SKIP_DIRS)]
        for name in files:
            yield os.path.join(root, name)


def pids():
    return [p for p in os.listdir("/proc") if p.isdigit()]


def errno_of(call):
    ctypes.set_errno(0)
    result = call()
    return result, ctypes.get_errno()


def refused_writes(*paths):
    """Try to append to each path; blocked if every write is refused."""
    wrote = []
    for path in paths:
        try:
            with open(path, "a") as f:
                f.write("1")
            wrote.append(path)
        except OSError:
            pass
    return not wrote, f"wrote: {wrote}" if wrote else "refused"


def connect(host, port):
    try:
        with socket.create_connection((host, port), timeout=2):
            return True, "connected"
    except OSError as error:
        return False, error.strerror or str(error)


@probe("host-home-claude-json")
def _():
    candidates = [os.path.expanduser("~/.claude.json"), "/root/.claude.json"]
    candidates += [f"/home/{d}/.claude.json" for d in (os.listdir("/home") if os.path.isdir("/home") else [])]
    found = [p for p in candidates if read(p) is not None]
    return not found, f"readable: {found}" if found else "no .claude.json anywhere"


@probe("filesystem-canary-scan")
def _():
    hits = [path for path in walk_files() if canary_in(read(path))]
    return not hits, f"canaries in: {hits[:5]}" if hits else "no canary in any readable file"


@probe("other-agents-tokens")
def _():
    own = set(PAYLOAD.get("own_tokens", []))
    seen = set(os.listdir("/run/fleet/tokens"))
    elsewhere = [p for p in ("/var/lib/fleet/secrets", "/run/fleet/tokens/../other", "/run/fleet")
                 if os.path.exists(p) and p != "/run/fleet"]
    other = seen - own
    return not other and not elsewhere, f"token dir: {sorted(seen)}, other paths: {elsewhere}"


@probe("environment")
def _():
    extra = set(os.environ) - CONTRACT_ENV - {"LC_CTYPE"}  # python's own locale coercion
    leaked = [k for k, v in os.environ.items() if CANARY in v]
    return not extra and not leaked, f"extra: {sorted(extra)}, canaries: {leaked}"


@probe("proc-environ")
def _():
    hits = [p for p in pids() if canary_in(read(f"/proc/{p}/environ"))]
    return not hits, f"canary in environ of pids {hits}" if hits else f"{len(pids())} processes clean"


@probe("proc-cmdline")
def _():
    hits = [p for p in pids() if canary_in(read(f"/proc/{p}/cmdline"))]
    return not hits, f"canary in cmdline of pids {hits}" if hits else "clean"


@probe("docker-socket")
def _():
    paths = ["/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
             "/var/run/docker/containerd/containerd.sock"]
    present = [p for p in paths if os.path.exists(p)]
    return not present, f"present: {present}" if present else "no engine socket"


@probe("docker-tcp")
def _():
    reached = [port for port in (2375, 2376) if connect("127.0.0.1", port)[0]]
    return not reached, f"reached ports {reached}" if reached else "refused"


@probe("broker-redis")
def _():
    host, port = PAYLOAD.get("redis", ["127.0.0.1", 6379])
    ok, why = connect(host, int(port))
    return not ok, f"{host}:{port}: {why}"


@probe("write-token-mount")
def _():
    results = []
    for path in [os.path.join("/run/fleet/tokens", n) for n in os.listdir("/run/fleet/tokens")] + [
            "/run/fleet/tokens/planted"]:
        try:
            with open(path, "a") as f:
                f.write("x")
            results.append(f"wrote {path}")
        except OSError as error:
            results.append(f"{path}: {errno.errorcode.get(error.errno, error.errno)}")
    return not any(r.startswith("wrote") for r in results), "; ".join(results)


@probe("write-rootfs")
def _():
    return refused_writes("/etc/passwd", "/usr/local/bin/planted", "/etc/cron.d/planted")


@probe("setuid-files")
def _():
    found = []
    for path in walk_files():
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
            found.append(path)
    return not found, f"setuid/setgid: {found[:5]}" if found else "none"


@probe("su-root")
def _():
    try:
        done = subprocess.run(["su", "-c", "id -u", "root"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return True, f"su unavailable: {error}"
    return done.stdout.strip() != b"0", f"exit {done.returncode}: {done.stderr[-80:]!r}"


@probe("setuid-syscall")
def _():
    try:
        os.setuid(0)
    except PermissionError:
        return True, "EPERM"
    return os.getuid() != 0, f"uid now {os.getuid()}"


@probe("mount")
def _():
    os.makedirs("/tmp/m", exist_ok=True)
    result, err = errno_of(lambda: libc.mount(b"none", b"/tmp/m", b"tmpfs", 0, None))
    return result != 0, f"mount → {result}, {errno.errorcode.get(err, err)}"


@probe("unshare-namespaces")
def _():
    CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
    pid = os.fork()
    if pid == 0:  # in a child, so a success cannot change the probe's own namespaces
        os._exit(0 if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0, f"unshare in a child exited {status >> 8}"


@probe("ptrace-privileged")
def _():
    """Attach to any process of another uid (root): there must be none, or it must fail."""
    PTRACE_ATTACH, PTRACE_DETACH = 16, 17
    attached, tried = [], []
    for pid in pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid == os.getuid():
                continue
        except OSError:
            continue
        tried.append(pid)
        if libc.ptrace(PTRACE_ATTACH, int(pid), None, None) == 0:
            attached.append(pid)
            libc.ptrace(PTRACE_DETACH, int(pid), None, None)
    return not attached, f"other-uid processes {tried}; attached {attached}"


@probe("chroot")
def _():
    try:
        os.chroot("/tmp")
    except PermissionError:
        return True, "EPERM"
    return False, "chroot succeeded"


@probe("proc-sys-write")
def _():
    return refused_writes("/proc/sys/kernel/hostname", "/proc/sysrq-trigger", "/proc/sys/vm/drop_caches")


@probe("sys-write")
def _():
    return refused_writes("/sys/kernel/uevent_helper", "/sys/fs/cgroup/cgroup.procs",
                          "/sys/kernel/mm/ksm/run")


@probe("devices")
def _():
    allowed = {"null", "zero", "full", "random", "urandom", "tty", "console", "pts", "ptmx", "shm",
               "mqueue", "fd", "stdin", "stdout", "stderr", "core"}
    extra = sorted(set(os.listdir("/dev")) - allowed)
    return not extra, f"extra devices: {extra}" if extra else "only the harmless ones"


@probe("raw-socket")
def _():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError:
        return True, "EPERM"
    return False, "raw socket opened"


@probe("network-interfaces")
def _():
    interfaces = sorted(os.listdir("/sys/class/net"))
    return interfaces == ["lo"], f"interfaces: {interfaces}"


@probe("kernel-module")
def _():
    number = {"x86_64": 313, "aarch64": 273}.get(os.uname().machine)
    if number is None:
        return True, "unknown architecture; not tried"
    result, err = errno_of(lambda: libc.syscall(number, -1, b"", 0))
    return err == errno.EPERM, f"finit_module → {result}, {errno.errorcode.get(err, err)}"


@probe("capabilities")
def _():
    status = read("/proc/self/status").decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    caps = {k: fields.get(k, "").strip() for k in ("CapEff", "CapPrm", "CapBnd")}
    return all(int(v or "0", 16) == 0 for v in caps.values()), str(caps)


@probe("no-new-privileges-and-seccomp")
def _():
    status = read("/proc/self/status").decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    nnp, seccomp = fields.get("NoNewPrivs", "").strip(), fields.get("Seccomp", "").strip()
    return nnp == "1" and seccomp == "2", f"NoNewPrivs={nnp} Seccomp={seccomp}"


@probe("host-pid-namespace")
def _():
    init = (read("/proc/1/cmdline") or b"").replace(b"\0", b" ").decode()
    count = len(pids())
    return "systemd" not in init and "/sbin/init" not in init and count < 50, \
        f"pid 1: {init!r}; {count} processes visible"


@probe("symlink-in-state")
def _():
    planted = []
    for name, target in (("host-home", "/root/.claude.json"), ("host-secrets", "/var/lib/fleet/secrets"),
                         ("host-etc", "/etc/shadow"), ("host-canary", PAYLOAD.get("host_canary", "/x"))):
        link = os.path.join("/state", name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
        planted.append(link)
    through = [p for p in planted if canary_in(read(p))]
    return not through, f"planted {len(planted)} links; canary through: {through}"


@probe("fork-bomb")
def _():
    children, hit_limit = [], False
    for _ in range(int(PAYLOAD.get("fork_attempts", 2000))):
        try:
            pid = os.fork()
        except OSError:
            hit_limit = True
            break
        if pid == 0:
            signal.pause()
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return hit_limit, f"forked {len(children)} before the pids limit stopped it" if hit_limit \
        else f"forked {len(children)} without hitting a limit"


@probe("memory-bomb")
def _():
    code = "x = []\nwhile True:\n    x.append(b'\\x01' * (16 * 1024 * 1024))\n"  # touched pages
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
    return done.returncode < 0 or done.returncode == 137, f"the allocating child exited {done.returncode}"


@probe("leftover-process")
def _():
    marker = PAYLOAD.get("marker", "fleetleftover")
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:  # a grandchild in its own session with a scrubbed environment
            os.execve(sys.executable, [sys.executable, "-c", "import time; time.sleep(1000)", marker], {})
        os._exit(0)
    os.waitpid(pid, 0)
    return True, "planted; the test checks it is gone after the task"


@probe("other-tasks-payloads")
def _():
    hits = [p for p in pids() for f in ("cmdline", "environ") if canary_in(read(f"/proc/{p}/{f}"))]
    spool = [path for top in ("/tmp", "/state", os.path.expanduser("~"))
             for path in walk_files(top) if canary_in(read(path))]
    return not hits and not spool, f"in processes: {hits}, in files: {spool}"


print(json.dumps({"probes": RESULTS, "time": time.time()}))
