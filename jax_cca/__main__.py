"""``python -m jax_cca``: the same as the ``jax-cca`` command."""

import sys

from jax_cca.cli import main

if __name__ == "__main__":
    sys.exit(main())
