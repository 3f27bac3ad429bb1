"""`python scripts/explore.py ...` from a checkout: `digits-explore`, with data/ and logs/ in the checkout (README)."""

import os
from pathlib import Path

os.environ.setdefault("DIGITS_ROOT", str(Path(__file__).resolve().parents[1]))

from digits.entry import explore

if __name__ == "__main__":
    explore()
