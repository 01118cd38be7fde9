"""Exceptions raised by SHE.

Every error a user can trigger derives from :class:`SheError`, so callers (the CLI,
the HTTP server) can turn it into a clear message instead of a traceback.
"""

from __future__ import annotations


class SheError(Exception):
    """Base class of every error SHE raises on purpose."""


class DataError(SheError):
    """A data file (IDX, npz, image) is missing, corrupt or of the wrong shape."""


class ModelError(SheError):
    """A model file is missing, corrupt, or not an HE-friendly model."""


class UnsupportedOperatorError(ModelError):
    """The model contains an operator the encrypted engine cannot run."""

    def __init__(self, node_name: str, op_type: str, hint: str) -> None:
        self.node_name = node_name
        self.op_type = op_type
        super().__init__(f"node '{node_name}' (operator {op_type}) cannot run encrypted: {hint}")


class ParameterError(SheError):
    """Encryption parameters are invalid, insecure, or cannot hold the model."""


class SecurityError(SheError):
    """A security rule was violated (for example, a secret key sent to a server)."""


class FormatError(SheError):
    """Bytes received (a ciphertext, a key, a message) are malformed or do not match."""
