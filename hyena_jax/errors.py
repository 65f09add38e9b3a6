"""Errors caused by what the user gave us (a path, a config field, a file's contents).

Raise `InputError` (or a subclass) where the fix is on the user's side; its message says what is
wrong, where (file, field, line) and what to do. The command-line tools print such an error as
one line, `error: <message>`, and exit 2. Any other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """Bad user input: a config field, a file's contents, a flag. The message names the fix."""


class MissingInputError(InputError, FileNotFoundError):
  """A path the user named does not exist or lacks what it should hold."""


class OutputExistsError(InputError, FileExistsError):
  """An output the user named already exists and the tool will not replace it."""


class MissingDependencyError(InputError, ImportError):
  """An optional package is not installed; the message names the pip command that adds it."""


def is_storage_failure(error: BaseException) -> bool:
  """A write that the storage refused (disk full, permissions), raised as an OSError by Python
  or as a RESOURCE_EXHAUSTED/PERMISSION_DENIED ValueError by tensorstore (orbax's arrays)."""
  if isinstance(error, OSError):
    return True
  text = str(error)
  return isinstance(error, ValueError) and any(
      mark in text for mark in ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "No space left"))


class DivergedError(InputError, FloatingPointError):
  """Training produced NaN/Inf (pretraining, fine-tuning or ICL); the message says how to go on,
  e.g. resume with a lower learning rate."""
