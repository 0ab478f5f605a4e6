"""The error every subcommand raises for bad input: `farm` prints it as one line and exits 2."""


class UsageError(Exception):
    pass
