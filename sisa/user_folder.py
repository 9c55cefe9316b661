"""This user's private folder on this node, ``$TMPDIR/sisa-<uid>/`` (mode 0700): warm workers, serving marks.

The temp folder is shared by every user of the node. What sisa keeps there (a warm worker's
socket, the marks of the replicas that serve here) must be reachable by this user only, and a
folder someone else made in its place (or a link to one) must not be used: another user could
then reach the socket, or fill this user's training with marks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["private_folder"]


def private_folder(*, create: bool = True) -> Path | None:
    """``$TMPDIR/sisa-<uid>/``, created 0700 when asked; None when it is missing or not this user's only.

    Args:
        create: Create it when missing.
    """
    folder = Path(tempfile.gettempdir()) / f"sisa-{os.getuid()}"
    try:
        if create:
            folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    if folder.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return folder
