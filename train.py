"""`python train.py ...` from a checkout: `digits-train`, with data/ and logs/ in the checkout (README)."""

import os
from pathlib import Path

os.environ.setdefault("DIGITS_ROOT", str(Path(__file__).resolve().parent))

from digits.entry import train

if __name__ == "__main__":
    train()
