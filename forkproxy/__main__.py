"""`python -m forkproxy`."""

from forkproxy.cli import main

main()
