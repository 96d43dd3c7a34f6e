import sys

from fedlora_jax.cli import main

sys.exit(main())
