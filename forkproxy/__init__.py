"""forkproxy: a forking TCP proxy for the Docker ambassador pattern."""

# The distribution's version too: pyproject.toml reads it from here, the one place.
__version__ = "0.1.0.dev0"
