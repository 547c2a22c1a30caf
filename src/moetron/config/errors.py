"""The one exception type for user mistakes: a readable paragraph, never a traceback."""


class ConfigError(ValueError):
    """A user-facing error. The message names the field, the value given and what would be valid."""


def invalid(field: str, value, valid: str, why: str = "") -> ConfigError:
    """Build the standard one-paragraph message for a bad config value."""
    reason = f" {why}" if why else ""
    return ConfigError(f"Invalid value for `{field}`: {value!r}.{reason} Valid: {valid}.")
