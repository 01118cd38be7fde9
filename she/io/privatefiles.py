"""Files and directories only their owner can read (secret keys, session ids).

A secret key written with ``open`` then ``chmod`` is readable by everyone in between, and
``open`` follows a symbolic link planted at the path. :func:`write_private` instead creates
a new file with mode 0600 (``O_EXCL | O_NOFOLLOW``) beside the target and renames it over
the target atomically: the data never exists in a wider file, and a link at the path is
replaced, never followed. :func:`private_directory` refuses a key directory others can
write to.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..errors import SecurityError


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable and writable by the owner only (mode 0600)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_directory(path: str | Path) -> Path:
    """``path`` as a directory for secret keys: created 0700 if missing; an existing one
    must belong to this user and be writable by nobody else (whoever can write there can
    swap a key file for one whose secret they know)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink():
        raise SecurityError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise SecurityError(f"{path} belongs to another user; choose a key directory of your own")
    if info.st_mode & 0o022:
        raise SecurityError(f"{path} is writable by other users; use a private key directory "
                            f"(chmod go-w {path})")
    return path
