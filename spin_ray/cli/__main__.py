"""`python -m spin_ray.cli`: the `spin-ray` command."""

import sys

from spin_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
