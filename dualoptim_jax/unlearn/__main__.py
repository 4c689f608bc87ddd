"""``python -m dualoptim_jax.unlearn``: the same as the ``dualoptim-unlearn`` command."""

import sys

from dualoptim_jax.unlearn.cli import main

sys.exit(main())
