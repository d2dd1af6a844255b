"""forkproxy: a forking TCP proxy for the Docker ambassador pattern."""

__version__ = "0.1.0.dev0"
