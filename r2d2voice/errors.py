"""Errors that end a command with a one-line message and a distinct exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3


class R2Error(Exception):
    """Base class: ``str(exc)`` is the one line shown to the user."""

    exit_code = EXIT_RUNTIME


class RuntimeFailure(R2Error):
    """The run failed for a reason that may go away (network, service)."""

    exit_code = EXIT_RUNTIME


class UsageError(R2Error):
    """Bad invocation, or an input file that cannot be used."""

    exit_code = EXIT_USAGE


class ConfigError(R2Error):
    """Missing or invalid setting, rejected API key, missing device or PortAudio."""

    exit_code = EXIT_CONFIG
