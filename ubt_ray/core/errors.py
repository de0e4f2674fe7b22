"""The error type of a mistake in the caller's input (a path, a checkpoint, a value): its message is one sentence
that names the thing and the fix, and the program prints it as such, never as a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, path, data) with a message naming the thing and the fix."""
