"""`python -m style_transfer.batch MANIFEST.csv [options]`, the same as `style.py batch`."""

import sys

from style_transfer.batch import batch_main

if __name__ == "__main__":  # spawned workers import this module too, under another name
    sys.exit(batch_main())
