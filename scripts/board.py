"""`python scripts/board.py ...` from a checkout: `digits-board`, on the checkout's logs/ by default (README)."""

import os
from pathlib import Path

os.environ.setdefault("DIGITS_ROOT", str(Path(__file__).resolve().parents[1]))

from digits.entry import board

if __name__ == "__main__":
    board()
