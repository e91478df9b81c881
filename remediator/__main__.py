"""Allow `python -m remediator`, which the demo uses to start worker processes."""

from remediator.cli import main

main()
