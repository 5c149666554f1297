"""Train a CLIP model with PGS masking. Same as launch/pretrain.py; see megapgs/entry.py.

    python pretrain.py                          # the embedded default: tiny CLIP on Fashion-MNIST, CPU
    python pretrain.py --config configs/vitb16_pgs03.json --set train.steps=100
"""
import sys

from megapgs.entry import main

if __name__ == "__main__":
    sys.exit(main())
