"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class SecureFPTError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ConfigError(SecureFPTError):
    """An experiment or policy file is missing, malformed or invalid."""


class DataError(SecureFPTError):
    """A client's data is missing, unreadable or has labels it should not have."""


class ModelUnavailableError(SecureFPTError):
    """The requested pre-trained model cannot be loaded (offline, wrong path)."""


class FederationError(SecureFPTError):
    """The federation cannot proceed (no eligible client, every client failed)."""


class RunInterrupted(SecureFPTError):
    """The operator stopped the run (Ctrl-C); its checkpoint after the last completed round is kept."""
