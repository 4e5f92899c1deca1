"""The errors leanvit raises for problems with what a user gave it, as opposed to bugs in leanvit.

Each message names the input (file, folder, argument) and what was expected, in one line. The command line prints
these without a traceback (``UsageError`` exits with 2, the others with 1) and keeps tracebacks for genuine bugs.
Each class also derives from the built-in type a caller would catch without knowing leanvit (``ValueError``,
``RuntimeError``, ``FloatingPointError``), so ``except ValueError`` keeps working.
"""


class LeanvitError(Exception):
    """A problem with the user's input; the message names the input and what was expected."""


class UsageError(LeanvitError, ValueError):
    """An argument or recipe value of the wrong type or outside its valid range."""


class CheckpointError(LeanvitError, ValueError):
    """A checkpoint or its sidecar that is corrupt, truncated, of the wrong kind or not a file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds Python objects other than tensors and plain containers, so it was not loaded."""


class RunDirectoryError(LeanvitError, ValueError):
    """A run directory that cannot be used as it is: a sidecar fails validation, or it is not a writable folder."""


class RunLockedError(RunDirectoryError):
    """Another live process owns the run directory."""


class DataError(LeanvitError, ValueError):
    """A dataset folder whose layout or content is not what leanvit reads (no class folders, an empty class, ...)."""


class BadImageError(DataError):
    """An image file that cannot be opened, decoded or converted; the message names its path."""


class ExportVerificationError(LeanvitError, RuntimeError):
    """The exported file (or the re-parameterized model) disagrees with the PyTorch model beyond the tolerance."""


class TrainingDivergedError(LeanvitError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""
