"""The one error type for mistakes a user must fix; commands print its message as one line."""


class ConfigError(ValueError):
    """A configuration or input mistake the user must fix; the message says how."""
