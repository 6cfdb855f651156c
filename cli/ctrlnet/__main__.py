"""`python -m ctrlnet` = the `ctrlnet` command."""

from ctrlnet.cli import main

main()
