"""`python -m forkproxy`."""

from forkproxy.console import main

main()
