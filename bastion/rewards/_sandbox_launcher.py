"""The sandbox launcher: a fixed, standard-library-only script that bastion/rewards/sandbox.py
runs as `python -I -S -B -c <this file's text> <config json>` in a new session.

It is a separate fresh process (not a `preexec_fn`) because the trainer scores completions
from threads, and code run between fork and exec of a threaded process can deadlock. It
never imports bastion: its whole input is the JSON config (paths, a uid, limits, no secrets).

Mode "full" (Linux, root): new mount, network, PID, IPC and UTS namespaces; the child is
PID 1 of the new PID namespace, so when it exits (or is killed with the launcher, through
its parent-death signal) the kernel kills every process the code started. The mount
namespace gets a private size-limited tmpfs as /tmp (the working directory), /dev/shm, a
read-only empty /var/tmp and /run/lock, tmpfs over the trainer's home (the interpreter's
installation is bound back in when it lives there), and its own /proc. Then the resource
limits, then the switch to the sandbox uid, then exec of the runner.
Mode "uid": no namespaces (no CAP_SYS_ADMIN); limits and the uid switch only.
Mode "none": limits only, same uid (opt-in fallback).

Reports go to the status pipe as JSON lines: {"setup_error": ...} when setup fails,
{"exit": code, "signal": n, "cpu": seconds} when the child ends.
"""
import ctypes
import json
import os
import resource
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

LIBC = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = (lambda s: s.encode() if s is not None else None)
    _check(LIBC.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _report(fd, **fields):
    os.write(fd, (json.dumps(fields) + "\n").encode())


def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _setup_mounts(cfg, workdir_fd):
    uid, tmp = cfg["uid"], "/tmp"
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['tmp_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
    for name in cfg["files"]:  # the trainer's files, read through the fd opened before the tmpfs hid them
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=workdir_fd)
        dst = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        while chunk := os.read(src, 1 << 16):
            os.write(dst, chunk)
        os.fchown(dst, uid, uid)
        os.close(src)
        os.close(dst)
    _hide(cfg["hide"], cfg["expose"], tmp)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size=16m,mode=0700,uid={uid},gid={uid}")
    for path in ("/var/tmp", "/run/lock", "/dev/mqueue"):  # the other world-writable places: empty, read-only
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    try:  # our own /proc: the trainer's processes are not even listed (best effort: some kernels refuse)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass


def _hide(hide, expose, tmp):
    """Cover each directory in `hide` with an empty tmpfs; bind `expose` (the interpreter's
    installation, e.g. under root's home) back in, read-only, at its own path, because the
    interpreter finds its shared library and standard library by absolute path."""
    stage = None
    if expose and any(_under(expose, h) for h in hide):
        stage = os.path.join(tmp, ".python-stage")
        os.mkdir(stage, 0o700)
        _mount(expose, stage, None, MS_BIND | MS_REC)
    for path in hide:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    if stage:
        os.makedirs(expose, 0o755, exist_ok=True)
        _mount(stage, expose, None, MS_BIND | MS_REC)
        _mount(None, expose, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
        _check(LIBC.umount2(stage.encode(), MNT_DETACH), "umount stage")
        os.rmdir(stage)


def _set_limits(cfg):
    cpu = cfg["cpu_seconds"]
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu),  # soft == hard: SIGKILL (PID 1 of a namespace ignores SIGXCPU)
        resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2,
        resource.RLIMIT_DATA: (cfg["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (cfg["file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (cfg["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for name in ("RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE"):  # Linux only
        if hasattr(resource, name):
            limits[getattr(resource, name)] = (0, 0)
    if cfg["nproc"]:
        limits[resource.RLIMIT_NPROC] = (cfg["nproc"],) * 2
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # all capabilities go with uid 0


def _child(cfg, workdir_fd, alive_r, status_fd):
    if cfg["mode"] == "full":
        _setup_mounts(cfg, workdir_fd)
    os.close(workdir_fd)
    _set_limits(cfg)
    if cfg["mode"] in ("full", "uid"):
        _drop_privileges(cfg["uid"])
    if sys.platform.startswith("linux"):
        _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # no setuid binary regains root
        _check(LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid, which clears it
    if select.select([alive_r], [], [], 0)[0]:  # the launcher died before the death signal was armed
        os._exit(1)
    os.close(alive_r)
    os.chdir(cfg["cwd"])
    os.set_inheritable(cfg["result_fd"], True)
    os.set_inheritable(status_fd, False)  # closed by a successful exec, still ours if exec fails
    python = cfg["python"]
    os.execve(python, [python, "-I", "-S", "-B", "-c", cfg["runner"], str(cfg["result_fd"])], cfg["env"])


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    try:
        workdir_fd = os.open(cfg["workdir"], os.O_RDONLY | os.O_DIRECTORY)
        if cfg["mode"] == "full":
            _check(LIBC.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        alive_r, alive_w = os.pipe()
        pid = os.fork()
    except OSError as exc:
        _report(status_fd, setup_error=str(exc))
        os._exit(70)
    if pid == 0:
        try:
            os.close(alive_w)
            _child(cfg, workdir_fd, alive_r, status_fd)
        except BaseException as exc:  # report any setup failure as one line; never run the code half-isolated
            _report(status_fd, setup_error=f"{type(exc).__name__}: {exc}")
        os._exit(70)
    os.close(alive_r)
    os.close(cfg["result_fd"])
    _, status, usage = os.wait4(pid, 0)
    _report(status_fd, exit=os.waitstatus_to_exitcode(status), cpu=usage.ru_utime + usage.ru_stime)
    os._exit(0)


if __name__ == "__main__":
    main()
