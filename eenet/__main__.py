"""``python -m eenet`` (and ``torchrun -m eenet``) run the command line."""
from eenet.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="eenet")
