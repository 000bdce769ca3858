"""``python -m cardigan.cli``: the same as the ``cardigan`` script."""

from cardigan.cli import main

main()
