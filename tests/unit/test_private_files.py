"""The state folder is the user's alone: modes we create, checks before use, logs that follow no
link, child output shown rather than obeyed. Files in temp folders only; no subprocess.

The tests run as root here, and root passes every permission check: so ownership and modes are
set explicitly (``os.chown`` to a uid nobody has, group/other-writable modes) and the decisions
about them are checked, never an EACCES.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from helpers import needs_root

from mlx_stack import logfiles, private
from mlx_stack.atomic import write_atomic
from mlx_stack.errors import StateError
from mlx_stack.paths import StatePaths
from mlx_stack.supervisor import processes
from mlx_stack.supervisor.logsink import RotatingLog
from mlx_stack.supervisor.runtime import OsRuntime

STRANGER = 54321  # a uid (and gid) that no account has


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def old_layout(home: Path) -> None:
    """A state folder as older versions left it with umask 022: readable by everyone."""
    for sub in ("logs", "run/commands", "catalog"):
        (home / sub).mkdir(parents=True, mode=0o755, exist_ok=True)
    for f in ("stack.yaml", "logs/standard.log", "logs/standard.log.1", "run/state.json",
              "run/litellm.yaml"):
        (home / f).write_text("x\n")
        (home / f).chmod(0o644)
    home.chmod(0o755)


# --- modes we create -------------------------------------------------------------------------

def test_make_dirs_makes_every_new_level_private(tmp_path):
    leaf = private.make_dirs(tmp_path / "a" / "b" / "c")
    for level in (tmp_path / "a", tmp_path / "a" / "b", leaf):
        assert mode(level) == 0o700
    private.make_dirs(leaf)  # existing: fine, unchanged


def test_atomic_writes_are_private_by_default_and_make_private_folders(tmp_path):
    target = tmp_path / "new" / "state.json"
    write_atomic(target, "{}")
    assert mode(target) == 0o600 and mode(target.parent) == 0o700
    write_atomic(tmp_path / "unit.service", "x", mode=0o644)  # outside the state folder
    assert mode(tmp_path / "unit.service") == 0o644


def test_the_supervisor_runtime_writes_private_files_whatever_mode_it_is_asked(tmp_path):
    rt = OsRuntime()
    try:
        rt.write_file(tmp_path / "run" / "state.json", "{}", 0o644)
    finally:
        rt.close()
    assert mode(tmp_path / "run" / "state.json") == 0o600


def test_logs_and_their_backups_are_private(tmp_path):
    path = tmp_path / "logs" / "svc.log"
    log = RotatingLog(path, max_bytes=100, backups=2)
    for i in range(30):
        log.write_line(f"line {i:03d} of a log that rotates".encode())
    log.close()
    files = logfiles.all_log_files(path)
    assert len(files) == 3 and all(mode(f) == 0o600 for f in files)
    assert mode(path.parent) == 0o700


def test_state_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_STACK_HOME", "rel/home")
    assert StatePaths.from_env().home == tmp_path / "rel" / "home"


# --- checks before use -----------------------------------------------------------------------

def test_a_new_state_folder_is_made_private(tmp_path):
    home = tmp_path / "home"
    assert private.secure_state_folder(home, create=True) == []
    assert mode(home) == 0o700


def test_a_missing_folder_is_left_alone_unless_asked(tmp_path):
    assert private.secure_state_folder(tmp_path / "nope") == []
    assert not (tmp_path / "nope").exists()


def test_an_old_readable_layout_is_made_private_and_said(tmp_path):
    home = tmp_path / "home"
    old_layout(home)
    notes = private.secure_state_folder(home)
    assert len(notes) == 1 and "private" in notes[0] and str(home) in notes[0]
    for path in [home, *home.rglob("*")]:
        assert mode(path) & 0o077 == 0, path
    assert mode(home / "logs") == 0o700 and mode(home / "logs" / "standard.log.1") == 0o600
    assert private.secure_state_folder(home) == []  # nothing left to say


@needs_root
def test_a_folder_owned_by_another_user_is_refused_with_the_chown_fix(tmp_path):
    home = tmp_path / "home"
    old_layout(home)
    os.chown(home, STRANGER, -1)
    with pytest.raises(StateError) as info:
        private.secure_state_folder(home)
    text = str(info.value)
    assert f"{home} belongs to uid {STRANGER}, not to you" in text
    assert f"`sudo chown -R {private.user_name(os.geteuid())} {home}`" in text
    assert mode(home / "stack.yaml") == 0o644  # refused: nothing was changed


@needs_root
def test_a_file_inside_owned_by_another_user_is_refused(tmp_path):
    home = tmp_path / "home"
    old_layout(home)
    os.chown(home / "run" / "state.json", STRANGER, STRANGER)
    with pytest.raises(StateError, match=r"state\.json belongs to uid 54321"):
        private.secure_state_folder(home)


@needs_root
@pytest.mark.parametrize("where, bits", [
    ("", 0o777), ("", 0o1777), ("run", 0o757), ("run/state.json", 0o646), ("logs", 0o775),
])
def test_anything_writable_by_others_is_refused_with_the_chmod_fix(tmp_path, where, bits):
    home = tmp_path / "home"
    old_layout(home)
    target = home / where if where else home
    os.chown(target, -1, STRANGER)  # a group that is not the user's own
    target.chmod(bits)
    with pytest.raises(StateError) as info:
        private.secure_state_folder(home)
    text = str(info.value)
    assert f"{target} is writable by" in text and f"mode {bits:04o}" in text
    assert f"`chmod -R go-rwx {home}`" in text
    assert "Traceback" not in text


def test_group_writable_in_the_users_private_group_is_made_private(tmp_path, monkeypatch):
    """umask 002 with a group of one (Debian/Ubuntu): the group is the user, so it is repaired."""
    monkeypatch.setattr(private, "_only_mine", lambda gid, uid: True)
    home = tmp_path / "home"
    old_layout(home)
    home.chmod(0o775)
    (home / "run" / "state.json").chmod(0o664)
    assert private.secure_state_folder(home)
    assert mode(home) == 0o700 and mode(home / "run" / "state.json") == 0o600


def test_links_inside_are_not_followed_or_changed(tmp_path):
    home = tmp_path / "home"
    old_layout(home)
    outside = tmp_path / "shared.txt"
    outside.write_text("not ours to change")
    outside.chmod(0o644)
    (home / "catalog" / "team.yaml").symlink_to(outside)
    private.secure_state_folder(home)
    assert mode(outside) == 0o644


@pytest.mark.parametrize("gid, uid, members, users, alone", [
    (1000, 1000, [], [("ann", 1000, 1000)], True),  # user private group
    (1000, 1000, ["ann"], [("ann", 1000, 1000)], True),
    (1000, 1000, [], [("ann", 1000, 1000), ("bob", 1001, 1000)], False),  # bob's primary too
    (100, 1000, ["ann", "bob"], [("ann", 1000, 1000), ("bob", 1001, 1001)], False),
    (100, 1000, ["ann"], [("ann", 1000, 1000)], True),  # listed member, nobody else
    (100, 1000, [], [("ann", 1000, 1000)], False),  # an empty group is nobody's
])
def test_a_group_counts_as_the_user_only_when_the_user_is_its_sole_member(
        gid, uid, members, users, alone):
    assert private.sole_member(gid, uid, members, users) is alone


@needs_root
def test_distrust_names_the_owner_or_the_writers(tmp_path):
    f = tmp_path / "lib.so"
    f.write_bytes(b"x")
    f.chmod(0o755)
    assert private.distrust(os.stat(f)) is None
    f.chmod(0o757)
    assert private.distrust(os.stat(f)) == "every user can write it (mode 0757)"
    f.chmod(0o755)
    os.chown(f, STRANGER, -1)
    assert f"belongs to uid {STRANGER}" in private.distrust(os.stat(f))


@needs_root
def test_a_sticky_parent_is_safe_but_a_writable_one_is_not(tmp_path):
    parent = tmp_path / "p"
    child = parent / "c"
    child.mkdir(parents=True)
    parent.chmod(0o1777)
    assert private.safe_ancestors(child) is None
    parent.chmod(0o777)
    assert private.safe_ancestors(child) == f"every user can write {parent}"
    parent.chmod(0o755)
    os.chown(parent, STRANGER, -1)
    assert private.safe_ancestors(child) == f"{parent} belongs to uid {STRANGER}"


# --- logs: no link is followed ---------------------------------------------------------------

def test_a_link_planted_as_a_log_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    logs = private.make_dirs(tmp_path / "logs")
    (logs / "svc.log").symlink_to(victim)
    log = RotatingLog(logs / "svc.log", 10_000, 2)
    log.write_line(b"a line from the service")
    log.close()
    assert victim.read_text() == "precious\n"
    assert not (logs / "svc.log").is_symlink()
    assert (logs / "svc.log").read_text() == "a line from the service\n"
    warning = log.take_error()
    assert f"{logs / 'svc.log'} was a symbolic link to {victim}" in warning
    assert log.take_error() is None


def test_a_fifo_planted_as_a_log_does_not_block_the_writer(tmp_path):
    os.mkfifo(tmp_path / "svc.log")
    f, warning = logfiles.open_append(tmp_path / "svc.log")
    f.close()
    assert warning and "not a regular file" in warning
    assert stat.S_ISREG(os.lstat(tmp_path / "svc.log").st_mode)


def test_an_old_readable_log_is_made_private_when_opened(tmp_path):
    path = tmp_path / "svc.log"
    path.write_text("old\n")
    path.chmod(0o644)
    f, warning = logfiles.open_append(path)
    f.write(b"new\n")
    f.close()
    assert warning is None and mode(path) == 0o600 and path.read_text() == "old\nnew\n"


def test_readers_do_not_follow_links(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("do not show\n")
    (tmp_path / "x.log").symlink_to(secret)
    assert logfiles.tail(tmp_path / "x.log", 5) == []
    assert list(logfiles.read_lines(tmp_path / "x.log")) == []
    assert logfiles.all_log_files(tmp_path / "x.log") == []


# --- child output on a terminal --------------------------------------------------------------

@pytest.mark.parametrize("raw, shown", [
    ("\x1b[2J\x1b]0;pwned\x07title", "^[[2J^[]0;pwned^Gtitle"),
    ("progress 10%\rprogress 99%", "progress 10%^Mprogress 99%"),
    ("tab\tkept", "tab\tkept"),
    ("nul\x00 del\x7f", "nul^@ del^?"),
    ("csi \x9b31m", "csi \\x9b31m"),
    ("naïve café — ✓", "naïve café — ✓"),
])
def test_printable_shows_control_characters_instead_of_obeying_them(raw, shown):
    assert logfiles.printable(raw) == shown


# --- services do not import from their working folder ----------------------------------------

def test_python_modules_run_without_their_working_folder_on_the_path():
    assert processes.python_module("m", safe_path_flag=True) == [sys.executable, "-P", "-m", "m"]
    boot = processes.python_module("m", safe_path_flag=False)
    assert boot[:2] == [sys.executable, "-c"] and boot[3] == "m"
    assert "sys.path.pop(0)" in boot[2]
    guarded = processes.guarded([sys.executable, "-m", "mlx_lm", "server"], 7)
    assert guarded[guarded.index("--fd") + 1] == "7" and guarded[-3:] == ["-m", "mlx_lm", "server"]
    assert processes.SAFE_PATH_ENV == {"PYTHONSAFEPATH": "1"}


def test_every_key_file_reader_repairs_the_mode_and_words_unreadable_keys(tmp_path):
    """Proxy, remote and external-server keys go through one reader: a key others can read is
    made 0600; a file that is not UTF-8 is a one-line error (it was a traceback for the proxy
    key); a missing file names what to do."""
    import stat as stat_

    import pytest

    from mlx_stack.config.proxykey import KeyFileError, read_key, read_key_file
    from mlx_stack.config.remotes import read_remote_key
    from mlx_stack.errors import StateError

    key = tmp_path / "k.key"
    key.write_text("sk-" + "x" * 30 + "\n")
    key.chmod(0o644)
    assert read_key(key) == "sk-" + "x" * 30
    assert stat_.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o640)
    assert read_remote_key(key, "b") == "sk-" + "x" * 30
    assert stat_.S_IMODE(key.stat().st_mode) == 0o600
    key.write_bytes(b"\xff\xfe sk-bad")
    with pytest.raises(StateError, match=r"cannot read the proxy key .*not UTF-8"):
        read_key(key)
    with pytest.raises(StateError, match=r"remote 'b': cannot read its key file .*not UTF-8"):
        read_remote_key(key, "b")
    with pytest.raises(KeyFileError) as info:
        read_key_file(tmp_path / "absent.key")
    assert info.value.missing
    with pytest.raises(StateError, match=r"no key file at .*copy the remote's `mlx-stack key`"):
        read_remote_key(tmp_path / "absent.key", "b")
