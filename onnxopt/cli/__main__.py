"""`python -m onnxopt.cli ...`: the `onnxopt` command."""

import sys

from onnxopt.cli import main

sys.exit(main())
