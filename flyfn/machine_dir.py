"""A Machine's own directory, shared by its worker processes: where they keep what must hold per
Machine rather than per process (the record of issued replays, the app's Machine list, the lock
of the schedules' one ticker, the requests in flight, the metrics of its workers).

It is `<base>/flyfn-<machine id>/`, `<base>` being `$FLYFN_MACHINE_DIRS` when set, else `/dev/shm`
when this user can write there (RAM:
a file create costs about 4 µs, against 18 µs on a disk's ext4 /tmp and hundreds while other
processes write to that disk), else `tempfile.gettempdir()`. On Fly each Machine has its own
/dev/shm and /tmp; the emulator's Machines share this computer's, hence the id in the name (and
`flyfn dev` gives its Machines a directory of the run's, `MACHINE_DIRS_ENV`, which it removes as it
stops, and removes a Machine's directory when it destroys the Machine).

A directory is used only when it is this user's, mode 0700 and not a symlink: in a shared temp
dir another user could have made it first.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = [
    "MACHINE_DIRS_ENV",
    "base_dir",
    "default_base",
    "machine_dir",
    "private_dir",
    "remove_machine_dir",
]

# Where Machines' directories live; None: `default_base()` (tests set it).
base_dir: str | None = None
# The environment variable that, when set, names where Machines' directories live: `flyfn dev`
# gives its Machines one of the run's (they share this computer's /dev/shm, which is never
# emptied by a boot as each Fly Machine's is), and tests give `flyfn dev` one they clean up.
MACHINE_DIRS_ENV = "FLYFN_MACHINE_DIRS"
_SHM = "/dev/shm"  # noqa: S108 (a private 0700 directory is made in it and checked: private_dir)
# A Machine id names a directory: Fly's are lowercase hex; anything else gets none.
_MACHINE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def default_base() -> str:
    """The directory Machines' directories live under (see `base_dir`)."""
    if base_dir is not None:
        return base_dir
    if configured := os.environ.get(MACHINE_DIRS_ENV):
        return configured
    if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK | os.X_OK):
        return _SHM
    return tempfile.gettempdir()


def private_dir(path: str | Path) -> bool:
    """Create `path` (mode 0700) if need be; whether it is a directory of this user that no one
    else may write to, and not a symlink."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _path(machine_id: str, base: str | None) -> Path | None:
    if not _MACHINE_ID_RE.fullmatch(machine_id):
        return None
    return Path(base or default_base()) / f"flyfn-{machine_id}"


def machine_dir(machine_id: str | None, name: str, *, base: str | None = None) -> Path | None:
    """The Machine's private directory `name` (created), or None when the Machine has no id that
    can name a directory or the directory is not private to this user."""
    if not machine_id:
        return None
    root = _path(machine_id, base)
    if root is None:
        return None
    path = root / name
    if not (private_dir(root) and private_dir(path)):
        return None
    return path


def remove_machine_dir(machine_id: str, *, base: str | None = None) -> None:
    """Remove everything the Machine kept (its processes are gone: the emulator, as Fly drops a
    Machine's file system). Only a private directory of this user is removed."""
    root = _path(machine_id, base)
    if root is None or not root.is_dir() or root.is_symlink():
        return
    info = root.lstat()
    if info.st_uid == os.geteuid():
        shutil.rmtree(root, ignore_errors=True)
