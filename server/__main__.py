"""`python -m server ...` is `deltaserve serve ...`."""

import sys

from server.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
