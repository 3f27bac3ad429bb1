"""`python predict.py ...` from a checkout: `digits-predict`, with data/ and logs/ in the checkout (README)."""

import os
from pathlib import Path

os.environ.setdefault("DIGITS_ROOT", str(Path(__file__).resolve().parent))

from digits.entry import predict

if __name__ == "__main__":
    predict()
