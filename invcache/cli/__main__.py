"""``python -m invcache.cli`` (what torchrun launches): the ``invcache`` command."""

from invcache.cli import main

main()
