"""Errors that the CLI maps to exit codes.

A user mistake (bad option, unknown folder, settings that contradict an existing
build) is a ``UsageError`` and exits 2 with its message, never a traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the output folder's lock


class BatchsegError(Exception):
    """Base class for errors with a message meant for the user."""

    exit_code = EXIT_FAILED


class UsageError(BatchsegError):
    """The user asked for something that cannot be done as asked."""

    exit_code = EXIT_USAGE


class LockedError(BatchsegError):
    """Another run holds the lock on the output folder."""

    exit_code = EXIT_LOCKED


class ModelLoadError(UsageError):
    """A model spec (name, checkpoint, config) could not be turned into a model."""


class SchemaVersionError(UsageError):
    """A file was written by a schema version this code does not know."""
