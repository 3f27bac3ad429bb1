"""`python eval.py ...` from a checkout: `digits-eval`, with data/ and logs/ in the checkout (README)."""

import os
from pathlib import Path

os.environ.setdefault("DIGITS_ROOT", str(Path(__file__).resolve().parent))

from digits.entry import evaluate

if __name__ == "__main__":
    evaluate()
