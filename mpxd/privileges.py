"""Drop root privileges after binding: real, effective and saved ids, groups."""

from __future__ import annotations

import grp
import logging
import os
import pwd

__all__ = ["PrivilegeError", "drop_privileges", "ids_of", "unreadable_python", "user_name"]


log = logging.getLogger("mpxd")


class PrivilegeError(Exception):
    """The user or group is unknown, or the ids cannot be changed."""


def drop_privileges(user: str | None, group: str | None, warn: bool = True) -> None:
    """Become ``user`` (and ``group``, default: the user's primary group).

    Sets real, effective and saved ids, so that handler code can never get
    root back, and the supplementary groups (the user's, or just ``group``).
    Raises ``PrivilegeError`` for an unknown name or when not running as root.
    ``warn``: say if the user cannot read Python's own library (``--workers``
    after the first do not repeat it).
    """
    if not user and not group:
        return
    entry, gid = _entry_and_gid(user, group)
    uid = entry.pw_uid if entry is not None else os.getuid()
    if set(os.getresuid()) == {uid} and set(os.getresgid()) == {gid}:
        return                  # already that user and group (e.g. started by them)
    try:
        if entry is not None:
            os.initgroups(entry.pw_name, gid)
        else:
            os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        if entry is not None:
            os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    except PermissionError:
        who = user or group
        raise PrivilegeError(f"cannot switch to {who!r}: mpxd is not running as root") from None
    if entry is not None:
        os.environ["HOME"] = entry.pw_dir
        os.environ["USER"] = os.environ["LOGNAME"] = entry.pw_name
    if warn and (problem := unreadable_python()):
        log.warning("%s", problem)


def user_name() -> str:
    """The name of the user this process runs as (its number if it has none)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def unreadable_python() -> str | None:
    """Why this process cannot import from Python's own library any more, if so.

    A Python installed in root's home (pyenv, a virtual environment under
    /root) works for root; after ``--user`` every module not imported yet
    fails to import: the script's, and those Python imports lazily itself.
    """
    library = os.path.dirname(os.__file__)
    if os.access(library, os.R_OK | os.X_OK):
        return None
    return (f"user {user_name()} cannot read Python's standard library in {library}: "
            f"modules not imported yet will fail to import; run mpxd with a Python "
            f"that user can read (the system's python3, or a virtual environment "
            f"outside root's home)")


def ids_of(user: str | None, group: str | None) -> tuple[int, int] | None:
    """``(uid, gid)`` that ``drop_privileges`` switches to (-1: unchanged), for
    files made before it; None without ``--user``/``--group``, or for an
    unknown name (``drop_privileges`` names it)."""
    if not user and not group:
        return None
    try:
        entry, gid = _entry_and_gid(user, group)
    except PrivilegeError:
        return None
    return (entry.pw_uid if entry is not None else -1), gid


def _entry_and_gid(user: str | None, group: str | None) -> tuple[pwd.struct_passwd | None, int]:
    """The user's passwd entry (if any) and the group id: ``group``, else the user's."""
    try:
        entry = _lookup(pwd.getpwnam, pwd.getpwuid, user) if user else None
    except KeyError:
        raise PrivilegeError(f"unknown user {user!r}") from None
    try:
        gid = _lookup(grp.getgrnam, grp.getgrgid, group).gr_gid if group \
            else entry.pw_gid  # type: ignore[union-attr]
    except KeyError:
        raise PrivilegeError(f"unknown group {group!r}") from None
    return entry, gid


def _lookup(by_name, by_id, name: str):
    """A passwd or group entry by name, or by number when ``name`` is digits."""
    try:
        return by_name(name)
    except KeyError:
        if name.isdigit():
            return by_id(int(name))
        raise
