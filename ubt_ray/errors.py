"""The one error type a user can cause; the CLI prints it as one sentence, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, path, data) with a message naming the thing and the fix."""


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type or out of range."""
