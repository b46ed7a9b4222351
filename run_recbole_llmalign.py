"""Train and evaluate a plugin or RecBole model: see ``recbole_llmalign/cli.py`` for the flags."""

import sys

from recbole_llmalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
