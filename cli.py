"""The ``eenet`` command line; the commands live in :mod:`eenet.cli`.

Kept at the top of the repository so ``python cli.py ...`` works from a
checkout; the installed console script and ``python -m eenet`` use the
package directly.
"""
from eenet.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="eenet")
