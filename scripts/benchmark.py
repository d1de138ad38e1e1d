"""Speed and memory, side by side with a MONAI U-Net: the same as ``causalclipseg benchmark`` (see its --help).

    python scripts/benchmark.py --json benchmark.json
"""

import sys

from causalclipseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
