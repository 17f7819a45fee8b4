"""The one user-facing error type: the CLI prints its message on one line and exits 2."""


class MsfpError(Exception):
    """An error the user can fix (bad file, option, model or data). Internal bugs stay ordinary exceptions."""
