"""Drop root privileges after binding: real, effective and saved ids, groups."""

from __future__ import annotations

import grp
import os
import pwd

__all__ = ["PrivilegeError", "drop_privileges"]


class PrivilegeError(Exception):
    """The user or group is unknown, or the ids cannot be changed."""


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become ``user`` (and ``group``, default: the user's primary group)."""
    if not user and not group:
        return
    try:
        entry = pwd.getpwnam(user) if user else None
    except KeyError:
        raise PrivilegeError(f"unknown user {user!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid  # type: ignore[union-attr]
    except KeyError:
        raise PrivilegeError(f"unknown group {group!r}") from None
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
