"""The one error type of the library: a config, flag or input value that cannot work.

Its message is one line that names the flag or field and says the fix; entry points print it without a
traceback. It sits on the lowest floor so every module can raise it without importing the model config.
"""


class ConfigError(ValueError):
  """A config or flag value that cannot work; the message names the field and the fix."""
