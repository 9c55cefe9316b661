"""Where the ``sisa`` command sends Ray's own log lines: a log file by default, stderr with ``-v``.

Ray's driver logs through the ``ray`` logger (``Started a local Ray instance``, the token-auth
warning, ``Connecting to existing Ray cluster``), which Ray gives its own stderr handler when it is
imported. Only the CLI reroutes it, and only while a command runs: the library never touches a
user's Ray logging.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from sisa.errors import ConfigError

__all__ = ["LOG_DIR_ENV", "RAY_COMMANDS", "RayLog", "ray_log_dir"]

LOG_DIR_ENV = "SISA_LOG_DIR"  # where Ray's lines go instead of $TMPDIR/sisa-<uid>

# The commands that may start or join Ray; the others (status, eval, pending, audit) never import it.
RAY_COMMANDS = frozenset({"train", "delete", "apply", "verify", "add", "resume", "domains", "evaluate"})

# Ray's own driver format (ray_constants.LOGGER_FORMAT), which ray.init also sets on the handler.
_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"


def ray_log_dir() -> Path:
    """The folder for Ray's log lines: ``$SISA_LOG_DIR``, else ``$TMPDIR/sisa-<uid>`` (mode 0700); created.

    Not the store: a command refused or failing leaves a store byte for byte as it was, and
    read-only commands (``verify``, ``domains``) write nothing into it. The shared default
    falls back to a new private temporary folder when its name is taken by someone else or
    is a link.

    Raises:
        ConfigError: If ``$SISA_LOG_DIR`` cannot be created.
    """
    chosen = os.environ.get(LOG_DIR_ENV)
    if chosen:
        folder = Path(chosen).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{LOG_DIR_ENV}={chosen}: cannot create the folder for Ray's log lines ({exc.strerror or exc}); "
                f"point {LOG_DIR_ENV} at a writable folder, or unset it"
            ) from None
        return folder
    folder = Path(tempfile.gettempdir()) / f"sisa-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        mine = not folder.is_symlink() and folder.stat().st_uid == os.getuid()
    except OSError:
        mine = False
    return folder if mine else Path(tempfile.mkdtemp(prefix="sisa-"))


class _PrivateFileHandler(logging.FileHandler):
    """A ``FileHandler`` whose file is this user's only (mode 0600), like the folder it is in.

    Log lines name stores and addresses; the file outlives the command, so it must not be
    readable by anyone else even where the folder's mode is changed later.
    """

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # a file an older sisa made 0644
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


class RayLog:
    """Send the ``ray`` logger's lines to ``<ray_log_dir()>/ray-<command>.log`` while a command runs.

    The file is opened (for appending) at the first line Ray logs, so commands that log nothing
    create nothing. :meth:`stop` puts Ray's handlers back as they were.
    """

    def __init__(self, command: str) -> None:
        """Start routing at once.

        Args:
            command: The sub-command; it names the file.
        """
        import ray  # noqa: F401  # importing ray installs its stderr handler; it is replaced below

        self._logger = logging.getLogger("ray")
        self._saved = (list(self._logger.handlers), self._logger.propagate)
        self.path = ray_log_dir() / f"ray-{command}.log"
        self._handler = _PrivateFileHandler(self.path, mode="a", encoding="utf-8", delay=True)
        self._handler.setFormatter(logging.Formatter(_FORMAT))
        self._logger.handlers = [self._handler]
        self._logger.propagate = False

    @classmethod
    def start(cls, command: str, verbose: bool) -> RayLog | None:
        """Route Ray's lines for ``command`` to a file, unless ``verbose`` or the command never uses Ray.

        Args:
            command: The sub-command (``train``, ``delete``, ...).
            verbose: ``-v`` was given: leave Ray's lines on stderr.

        Returns:
            The routing (stop it with :meth:`stop`), or None when nothing was changed.
        """
        if verbose or command not in RAY_COMMANDS:
            return None
        return cls(command)

    def stop(self) -> bool:
        """Close the file and give the ``ray`` logger back its own handlers.

        Returns:
            Whether Ray logged anything during the command (into :attr:`path`).
        """
        written = self._handler.stream is not None
        self._logger.handlers = self._saved[0]
        self._logger.propagate = self._saved[1]
        self._handler.close()
        return written
