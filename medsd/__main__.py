"""`python -m medsd ...` is the `medsd` command."""

from medsd.cli import main

main()
