"""One error type for bad user input, printed as a single line by the CLIs."""


class ConfigError(ValueError):
    """A field of a config, rank table, data folder or CLI argument is invalid.

    The message always names the field, the bad value, and what is valid.
    """

    def __init__(self, field, value, valid):
        self.field = field
        self.value = value
        self.valid = valid
        super().__init__(f"{field}={value!r} is invalid: {valid}")
