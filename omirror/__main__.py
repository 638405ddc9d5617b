"""Lets ``python -m omirror`` behave exactly like the ``omirrord`` script."""

from omirror.cli import main

if __name__ == "__main__":
    main()
