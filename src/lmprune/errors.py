"""User-facing errors: the CLI prints one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, model dir, checkpoint, flags).

    Raised before any work starts; the CLI turns it into one line on stderr and exit code 2.
    """
