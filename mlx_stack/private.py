"""Who may touch the stack's files: the modes we create them with, and the checks before use.

The state folder holds the proxy key, the supervisor's snapshot (process ids it will signal),
the command folder it obeys, logs with prompts and command lines, and the working folder of
every service. So it is the user's alone: folders ``0700``, files ``0600``, every mode decided
here. Before a command uses the folder it is checked:

- anything in it owned by another user, or writable by other users, is refused with the exact
  fix (a folder someone else can write may already hold a planted file, so we do not repair
  it silently);
- what is merely readable by others (the modes of older versions) is made private, and said.

A group that holds only the user (a "user private group", the Debian/Ubuntu default with
umask 002) counts as the user: group-writable files there are made private, not refused.
The same tests (:func:`distrust`, :func:`safe_ancestors`) guard the embeddings server's
compiled kernels.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mlx_stack.errors import StateError

DIR_MODE = 0o700
FILE_MODE = 0o600
NO_FOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
"""Open flags: no link at the last component, no blocking on a FIFO planted there."""
NOT_A_FILE = (errno.ELOOP, errno.ENXIO, getattr(errno, "EMLINK", errno.ELOOP))
"""What ``open`` with ``NO_FOLLOW`` fails with on a link (or a FIFO with no reader)."""
#: Entries checked under the state folder at most (it holds a few dozen).
MAX_ENTRIES = 10_000


def owner_only(mode: int) -> int:
    """``mode`` without any group or other bits."""
    return mode & 0o700


class NotRegularFileError(OSError):
    """A path holds a link, a FIFO or anything else that is not a regular file."""


def open_read(path: Path) -> BinaryIO:
    """Open a file of the stack's for reading, never through a link and never blocking on a
    FIFO. FileNotFoundError if absent; NotRegularFileError if something else is there."""
    try:
        fd = os.open(path, os.O_RDONLY | NO_FOLLOW)
    except OSError as exc:
        if exc.errno in NOT_A_FILE:
            raise NotRegularFileError(exc.errno, f"{path} is not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(errno.EINVAL, f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def make_dirs(folder: Path) -> Path:
    """``mkdir -p`` whose every new level is ``0700`` (``Path.mkdir`` makes parents 0777)."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=DIR_MODE)
    return folder


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def sole_member(gid: int, uid: int, group_members: Iterable[str],
                users: Iterable[tuple[str, int, int]]) -> bool:
    """True if user ``uid`` is the only member of group ``gid``.

    ``users`` are ``(name, uid, primary gid)`` of every account, ``group_members`` the group's
    listed (supplementary) members. As Debian's OpenSSH does for StrictModes.
    """
    names = {name for name, u, _ in users if u == uid}
    primary = {u for _, u, g in users if g == gid}
    listed = set(group_members)
    return bool(primary | listed) and primary <= {uid} and listed <= names


@functools.lru_cache(maxsize=16)
def _only_mine(gid: int, uid: int) -> bool:
    try:
        group = grp.getgrgid(gid)
        users = [(p.pw_name, p.pw_uid, p.pw_gid) for p in pwd.getpwall()]
    except (KeyError, OSError):
        return False
    return sole_member(gid, uid, group.gr_mem, users)


def foreign_writer(st: os.stat_result, uid: int | None = None,
                   sticky_ok: bool = False) -> str | None:
    """Who else could change this file or folder (``None``: only its owner, ``uid``).

    With ``sticky_ok``, a folder writable by others with the sticky bit (``/tmp``) is not
    counted: nobody can rename or delete another's entries in it (fine for a parent, not for
    a folder whose entries we load). Callers check the owner themselves.
    """
    uid = os.geteuid() if uid is None else uid
    sticky = sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & stat.S_IWOTH and not sticky:
        return "every user"
    if st.st_mode & stat.S_IWGRP and not sticky and not _only_mine(st.st_gid, uid):
        try:
            return f"the group {grp.getgrgid(st.st_gid).gr_name!r}"
        except KeyError:
            return f"the group {st.st_gid}"
    return None


def distrust(st: os.stat_result, uid: int | None = None) -> str | None:
    """Why a file or folder must not be trusted (owned by another user, or writable by
    others), or ``None`` if it is safe to load from."""
    uid = os.geteuid() if uid is None else uid
    if st.st_uid != uid:
        return f"it belongs to {user_name(st.st_uid)}, not to you ({user_name(uid)})"
    who = foreign_writer(st, uid)
    return f"{who} can write it (mode {stat.S_IMODE(st.st_mode):04o})" if who else None


def safe_ancestors(folder: Path, uid: int | None = None) -> str | None:
    """Why another user could replace ``folder`` by renaming one of its parents, or ``None``.

    Each parent must belong to the user or to root and be writable by nobody else (a sticky
    folder such as ``/tmp`` is fine).
    """
    uid = os.geteuid() if uid is None else uid
    for parent in folder.absolute().parents:
        try:
            st = os.stat(parent)
        except OSError as exc:
            return f"cannot check {parent}: {exc.strerror or exc}"
        if st.st_uid not in (0, uid):
            return f"{parent} belongs to {user_name(st.st_uid)}"
        who = foreign_writer(st, uid, sticky_ok=True)
        if who:
            return f"{who} can write {parent}"
    return None


@dataclass
class Audit:
    """What is wrong with a state folder: refusals (with their fixes) and entries to tighten."""

    home: Path
    foreign: list[Path] = field(default_factory=list)
    writable: list[tuple[Path, str]] = field(default_factory=list)
    loose: list[Path] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return bool(self.foreign or self.writable)

    def fixes(self) -> list[str]:
        me = user_name(os.geteuid())
        out = []
        if self.foreign:
            out.append(f"sudo chown -R {me} {self.home}")
        if self.writable:
            out.append(f"chmod -R go-rwx {self.home}")
        return out

    def message(self) -> str:
        me = user_name(os.geteuid())
        lines = [f"  - {p} belongs to {_owner(p)}, not to you ({me})" for p in self.foreign[:5]]
        lines += [f"  - {p} is writable by {who}" for p, who in self.writable[:5]]
        more = len(self.foreign) + len(self.writable) - len(lines)
        lines += [f"  - and {more} more"] if more > 0 else []
        return (
            f"the state folder {self.home} is not yours alone, so nothing was started or read "
            "(another user could plant a file the stack would read or run):\n"
            + "\n".join(lines)
            + "\nCheck that nothing in it is foreign, then run: `"
            + "` and `".join(self.fixes())
            + "` (or set MLX_STACK_HOME to a folder of your own)"
        )


def _owner(path: Path) -> str:
    try:
        return user_name(os.lstat(path).st_uid)
    except OSError:
        return "another user"


def _entries(home: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """The state folder and everything under it, without following links (bounded)."""
    yield home, os.stat(home)  # the folder itself may be a link to a folder of the user's
    count = 0
    for root, dirs, files in os.walk(home, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root) / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            yield path, st
            count += 1
            if count >= MAX_ENTRIES:
                return


def audit(home: Path) -> Audit:
    """Inspect ``home`` (which must exist); changes nothing."""
    uid = os.geteuid()
    found = Audit(home)
    for path, st in _entries(home):
        if st.st_uid != uid:
            found.foreign.append(path)
            continue
        if stat.S_ISLNK(st.st_mode):
            continue  # a link's own mode means nothing; its target is not ours to judge
        who = foreign_writer(st, uid)
        if who:
            found.writable.append((path, f"{who} (mode {stat.S_IMODE(st.st_mode):04o})"))
        elif st.st_mode & 0o077:
            found.loose.append(path)
    return found


def secure_state_folder(home: Path, create: bool = False) -> list[str]:
    """Check the state folder before use; make private what is merely readable by others.

    Raises StateError, naming the fix, if anything in it belongs to another user or is
    writable by other users. Returns a note for each repair made (for the caller to show).
    Does nothing if the folder does not exist and ``create`` is false.
    """
    if create:
        make_dirs(home)
    elif not home.exists():
        return []
    try:
        found = audit(home)
    except OSError as exc:
        raise StateError(f"cannot check the state folder {home}: {exc.strerror or exc}") from None
    if found.refused:
        raise StateError(found.message())
    tightened = 0
    for path in found.loose:
        try:
            os.chmod(path, owner_only(stat.S_IMODE(os.lstat(path).st_mode)))
            tightened += 1
        except OSError as exc:
            raise StateError(f"cannot make {path} private: {exc.strerror or exc}; "
                             f"run `chmod -R go-rwx {home}`") from None
    if not tightened:
        return []
    return [f"made {tightened} file(s) and folder(s) in {home} private (mode 700/600): "
            "they were readable by other users"]
