"""Kernel-enforced isolation that the sandbox child applies to itself before it runs a generated program.

Why these layers: the audit hook in :mod:`sandbox_child` sees only what CPython chooses to audit
(``os.mkfifo`` raises no event, ``dir_fd``/``dst_dir_fd`` arguments and C libraries such as sqlite bypass path
checks), so it cannot be the boundary. The kernel can:

* :func:`readonly_root_with_scratch` — in the child's own mount namespace (``unshare --user --mount``),
  every mount read-only and the scratch directory a fresh tmpfs capped in bytes *and in files*: writes,
  ``chmod``, ``setxattr``, fifos anywhere else fail with ``EROFS`` whatever the uid;
* :func:`landlock_restrict` — Landlock (Linux ≥ 5.13): reads only from the interpreter's library and system
  directories, writes only in the scratch directory, no TCP, no signals or abstract sockets outside the
  sandbox, and no mount changes (so the read-only root cannot be remounted);
* :func:`deny_new_processes` — a seccomp filter: no ``fork``/``vfork``/``execve``, ``clone`` only for threads.
  Needed because the kernel uid stays 0 in a user namespace and ``RLIMIT_NPROC`` never binds uid 0;
* :func:`drop_capabilities` — none left, effective or bounding.

Why ctypes: Python 3.11 wraps none of these syscalls, libseccomp's Python binding needs a C build, the PyPI
Landlock bindings are pre-releases (``landlock`` 1.0.0.dev5), and bubblewrap caps neither reads nor the
number of files. Each function raises ``OSError`` when the kernel refuses; the child records what applied.
The child imports this file by path (it runs with ``-I -S``) and drops ``ctypes`` from ``sys.modules`` after.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
from collections.abc import Iterable, Sequence

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# Syscalls added since Linux 5.1 share one number on every architecture.
_SYS_MOUNT_SETATTR = 442
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_SYS_CLONE3 = 435

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def in_private_user_namespace() -> bool:
    """True inside a user namespace other than the initial one (its uid map is not the full identity).

    Why: :func:`readonly_root_with_scratch` must never run in the host's namespaces, where it would make the
    machine's own mounts read-only.
    """
    with open("/proc/self/uid_map", encoding="ascii") as f:
        return f.read().split() != ["0", "0", "4294967295"]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def readonly_root_with_scratch(scratch: str, size_bytes: int, max_files: int) -> None:
    """Make every mount read-only, then mount a tmpfs of ``size_bytes``, ``max_files`` files on ``scratch``.

    Only in a private user+mount namespace (``unshare`` gives it private propagation, so nothing leaks to the
    host); the tmpfs vanishes with the namespace, so the parent never sees the program's files.
    """
    if not in_private_user_namespace():
        raise OSError(0, "not in a private user namespace; refusing to remount the host's filesystems")
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(
        _libc.syscall(
            _SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
        ),
        "mount_setattr(/, ro, recursive)",
    )
    opts = f"size={size_bytes},nr_inodes={max_files},mode=0700".encode()
    _check(_libc.mount(b"tmpfs", os.fsencode(scratch), b"tmpfs", 0, opts), "mount tmpfs on scratch")
    os.chdir(scratch)  # the old cwd is the directory under the new mount


# Landlock: access rights by the ABI version that introduced them (include/uapi/linux/landlock.h).
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute … make_sym
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV  # valid on files
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_RULE_PATH_BENEATH = 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is absent or disabled."""
    ret = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(ret), 0)


def _handled_fs(abi: int) -> int:
    return (_FS_ABI1 | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)) | (
        _FS_IOCTL_DEV if abi >= 5 else 0
    )


def _add_path_rule(ruleset: int, path: str, allowed: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:  # e.g. /lib64 on aarch64: nothing to allow
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            allowed &= _FS_FILE_ONLY
        attr = _PathBeneathAttr(allowed, fd)
        _check(
            _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(attr), 0),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(fd)


def landlock_restrict(read: Iterable[str], write: Iterable[str]) -> int:
    """Confine this process (and what it starts) to reading ``read`` and reading+writing ``write``.

    Also denies every TCP bind/connect (ABI ≥ 4) and signals/abstract sockets that leave the sandbox
    (ABI ≥ 6). Returns the ABI used. Irrevocable.
    """
    abi = landlock_abi()
    if abi < 1:
        raise OSError(0, "Landlock is not available in this kernel")
    handled = _handled_fs(abi)
    attr = _RulesetAttr(
        handled,
        (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
        (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct as this ABI knows it
    ruleset = _check(
        _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0),
        "landlock_create_ruleset",
    )
    try:
        for path in read:
            _add_path_rule(ruleset, path, _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR)
        for path in write:
            _add_path_rule(ruleset, path, handled)
        no_new_privs()
        _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def no_new_privs() -> None:
    """Forbid gaining privileges through execve (setuid binaries, file capabilities); Landlock and seccomp
    require it of a process without CAP_SYS_ADMIN."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


# seccomp: classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]} (little-endian).
_BPF_LD_W_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000
# machine -> (AUDIT_ARCH_*, clone, syscalls that start a process or program)
_SECCOMP_ARCHES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "x86_64": (0xC000003E, 56, (57, 58, 59, 322)),  # fork, vfork, execve, execveat
    "aarch64": (0xC00000B7, 220, (221, 281)),  # execve, execveat (no fork/vfork syscalls)
}


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _assemble(prog: Sequence[tuple[int, int | str, int | str, int] | str]) -> list[tuple[int, int, int, int]]:
    """Resolve label names (plain strings in ``prog``) into BPF's relative jump offsets."""
    labels: dict[str, int] = {}
    code: list[tuple[int, int | str, int | str, int]] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    out = []
    for i, (op, jt, jf, k) in enumerate(code):
        out.append(
            (
                op,
                labels[jt] - i - 1 if isinstance(jt, str) else jt,
                labels[jf] - i - 1 if isinstance(jf, str) else jf,
                k,
            )
        )
    return out


def _no_process_filter(arch: int, clone: int, denied: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    prog: list[tuple[int, int | str, int | str, int] | str] = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # arch
        (_BPF_JEQ, "native", 0, arch),
        (_BPF_RET, 0, 0, _RET_ERRNO | _EPERM),  # another ABI (i386's int 0x80): refuse everything
        "native",
        (_BPF_LD_W_ABS, 0, 0, 0),  # nr
        (_BPF_JGE, "deny", 0, _X32_SYSCALL_BIT),
        *((_BPF_JEQ, "deny", 0, nr) for nr in denied),
        (
            _BPF_JEQ,
            "nosys",
            0,
            _SYS_CLONE3,
        ),  # its flags are in memory BPF cannot read; libc falls back to clone
        (_BPF_JEQ, 0, "allow", clone),
        (_BPF_LD_W_ABS, 0, 0, 16),  # clone's flags: low 32 bits of args[0]
        (_BPF_JSET, "allow", "deny", _CLONE_THREAD),
        "allow",
        (_BPF_RET, 0, 0, _RET_ALLOW),
        "deny",
        (_BPF_RET, 0, 0, _RET_ERRNO | _EPERM),
        "nosys",
        (_BPF_RET, 0, 0, _RET_ERRNO | _ENOSYS),
    ]
    return _assemble(prog)


def deny_new_processes() -> None:
    """Install a seccomp filter under which fork, vfork, execve and non-thread clones fail with EPERM."""
    machine = platform.machine()
    if machine not in _SECCOMP_ARCHES:
        raise OSError(0, f"no seccomp syscall table for {machine}")
    code = _no_process_filter(*_SECCOMP_ARCHES[machine])
    filters = (_SockFilter * len(code))(*(_SockFilter(*c) for c in code))
    fprog = _SockFprog(len(code), filters)
    no_new_privs()
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp filter")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> None:
    """Empty the bounding set (so no execve can regain a capability) and every capability set.

    Why: the namespace's root holds CAP_SYS_ADMIN over its mount namespace and could remount the root
    read-write where Landlock is absent.
    """
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            # EINVAL: past the kernel's last capability; EPERM: no CAP_SETPCAP, so none to lose on execve.
            break
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
