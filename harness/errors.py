"""What the entry points (train.py, tune.py, export.py) print for an error, and exit with.

Exit code 2: the settings or the files given are at fault (fix them and run again);
1: the work itself failed (a runtime error, a failed verification, a full disk);
130: interrupted (Ctrl-C; a run says what it was doing, `Progress`). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys

__all__ = ["Interrupted", "Progress", "exit_status", "first_line", "run_script"]


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_status(error: BaseException) -> tuple[int | None, str]:
    """`(exit code, one-line message)` for an error a user can act on; `(None, "")` for
    an unexpected one (a bug: let its traceback show)."""
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C; `Interrupted` says where
        return 130, str(error) or (
            "interrupted; files already written are kept: run the same command again."
        )
    callbacks = sys.modules.get("harness.callbacks")  # where training raises it
    if callbacks is not None and isinstance(error, callbacks.TrainingDiverged):
        return 1, str(error)  # names the phase, the step and the checkpoint kept
    export = sys.modules.get("larq_noisy.export")
    if export is not None and isinstance(error, export.VerificationError):
        return 1, f"export failed, nothing written: {error}"
    tuning = sys.modules.get("harness.tuning")
    if tuning is not None and isinstance(error, tuning.SearchFailed):
        return 1, str(error)  # keras-tuner's limit of failed trials, the last one's error
    if isinstance(error, (ValueError, FileNotFoundError)):  # bad settings, files, missing data
        return 2, f"error: {error}"
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, tf.errors.OpError):
        # E.g. a collective that timed out because another worker died: what it is, not
        # a guess about files.
        return 1, (
            f"TensorFlow runtime error ({type(error).__name__}): {first_line(error)}. "
            "Finished phases and arms are kept; run the same command again to resume."
        )
    if isinstance(error, OSError):  # a full disk, a file that vanished
        where = f" ({error.filename})" if error.filename else ""
        return 1, (
            f"{error.strerror or first_line(error)}{where}. Files already written are "
            "kept; run the same command again to resume."
        )
    return None, ""


def run_script(name: str, work) -> int:
    """Call `work()` for script `name`; the exit code: 0, or for an error a user can act
    on (and Ctrl-C), its code after printing it as one line `name: message`. A bug
    keeps its traceback."""
    try:
        work()
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - sorted by `exit_status`
        code, message = exit_status(error)
        if code is None:
            raise
        if isinstance(error, KeyboardInterrupt) and sys.stdout.isatty():
            print(flush=True)  # off the line a progress bar was drawing
        print(f"{name}: {message}", file=sys.stderr)
        return code
    return 0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what it was doing and where."""


class Progress:
    """What a run is doing (`doing`, set as it goes); as a context manager, it turns a
    `KeyboardInterrupt` (Ctrl-C) into `Interrupted` saying so."""

    def __init__(self, root: str):
        self.root = root
        self.doing = "starting"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            raise Interrupted(
                f"interrupted while {self.doing} in {self.root}; finished phases and arms "
                "and the last backup are kept: run the same command again to resume."
            ) from None
