"""The one error type a stage turns into a one-line message and exit code 2.

Raise `StageError` (or a subclass) for anything the user must fix: a missing or corrupt
input file, an empty source, a value that cannot work. The message names the file and the
problem; `tasks.stage.main` prints it without a traceback.
"""


class StageError(RuntimeError):
    """A problem with a stage's inputs or settings that the user must fix."""
