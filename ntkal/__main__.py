"""`python -m ntkal ...` is the `ntkal` command."""
import sys

from .cli import main

sys.exit(main())
