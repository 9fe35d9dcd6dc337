"""The error for a configuration value that cannot work; its message names the key and a fix."""


class ConfigError(ValueError):
    """A configuration value that cannot work, with the key that holds it."""
