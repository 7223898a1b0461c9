"""``python -m mpxd``: the same as the ``mpxd`` command."""

from .cli import main

main(prog_name="mpxd")
