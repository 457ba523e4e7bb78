#!/usr/bin/env python3
"""Neural artistic style transfer on Caffe nets: see README.md, or run with --help."""

import sys

from style_transfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
