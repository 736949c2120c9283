"""`python -m onnxopt ...`: the `onnxopt` command."""

import sys

from onnxopt.cli import main

sys.exit(main())
