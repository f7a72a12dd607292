"""`python -m gradtrace`: the command line where the `gradtrace` script is not on PATH (a venv not activated)."""
import sys

from gradtrace.cli import main

sys.exit(main())
