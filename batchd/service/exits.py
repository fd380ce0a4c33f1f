"""Exit codes (sysexits.h style) and the failures at start that map onto them.

Under systemd's `Restart=on-failure` the code decides what happens next: a temporary
failure (75) is worth a restart, a configuration one (2, 78) is not, and the unit lists
those in `RestartPreventExitStatus=` (docs/operations.md, "Exit codes").
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # a loop crashed or a second signal at run time: a restart may help
EXIT_USAGE = 2  # the command line is wrong (argparse's own code)
EXIT_SOFTWARE = 70  # EX_SOFTWARE: an error batchd did not foresee, a bug
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: try again later (a port or a lock held by another process)
EXIT_CONFIG = 78  # EX_CONFIG: the configuration, the key or the installation must be fixed

# Codes a restart cannot fix: the unit's RestartPreventExitStatus= lists exactly these.
# An unforeseen error (70) at start is almost always deterministic: restarting it every
# 5 s forever would bury its one clear log line; a loop crashing at run time exits 1.
NOT_RESTARTABLE = frozenset({EXIT_USAGE, EXIT_SOFTWARE, EXIT_CONFIG})


class StartupError(Exception):
    """A failure with a message a person can act on, its log event and its exit code."""

    exit_code = EXIT_SOFTWARE
    event = "start_failed"

    def __init__(self, message: str, *, event: str | None = None) -> None:
        super().__init__(message)
        if event is not None:
            self.event = event


class ConfigurationError(StartupError):
    """Only a person can fix it (a path, a key, a newer schema): exit 78, no restart."""

    exit_code = EXIT_CONFIG
    event = "configuration_error"


class TemporaryError(StartupError):
    """Another process holds something we need (a port, a lock): exit 75, restart later."""

    exit_code = EXIT_TEMPFAIL
    event = "temporarily_unavailable"
