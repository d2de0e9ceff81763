"""Errors raised for checkpoints that are missing, malformed or unsafe."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (file, shard, header or index) is malformed, inconsistent or unsafe to open."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, or a shard named by its index, does not exist (also a ``FileNotFoundError``)."""
