"""Errors the CLI turns into one line and an exit code (no traceback)."""


class UserError(Exception):
    """Bad input from the user (config, data, model dir, checkpoint, flags).

    Raised before any work starts; the CLI turns it into one line on stderr and exit code 2.
    """


class NonFiniteError(Exception):
    """Training or evaluation produced non-finite numbers (NaN / inf); exit code 3.

    Raised after `train.max_skipped_steps` consecutive skipped steps, when a tensor about to be
    checkpointed or exported is not finite, or when an evaluated perplexity is not finite.
    """

    exit_code = 3


class Interrupted(Exception):
    """A run stopped on SIGTERM / SIGINT after checkpointing; exit code 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
