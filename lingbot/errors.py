"""One error type for bad input: the CLI prints its message as a single line and exits 2."""


class LingbotError(Exception):
    """A user-facing failure: the message names the file, episode or column at fault."""
