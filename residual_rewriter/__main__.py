"""``python -m residual_rewriter`` is the ``residual-rewriter`` command line."""
import sys

from residual_rewriter.cli import main

sys.exit(main())
