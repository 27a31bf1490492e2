"""``python -m mlx_stack.supervisor``: the supervisor process of one stack (see main.py)."""

import sys

from mlx_stack.supervisor.main import main

sys.exit(main())
