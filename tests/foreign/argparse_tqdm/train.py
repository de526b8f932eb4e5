"""Train a toy surrogate: argparse, a tqdm bar per epoch, one summary line per epoch."""

import argparse
import json
import math

from tqdm import tqdm

parser = argparse.ArgumentParser(description="toy FNO-ish trainer")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--width", type=int, default=16)
parser.add_argument("--epochs", type=int, default=5)
args = parser.parse_args()

for epoch in range(1, args.epochs + 1):
    for _ in tqdm(range(50), desc=f"epoch {epoch}", ncols=90, mininterval=0):
        pass
    loss = (math.log10(args.lr) + 2.5) ** 2 + 4.0 / args.width + 1.0 / epoch
    val = 1.1 * loss
    print(f"Epoch {epoch}/{args.epochs} loss={loss:.5f} val={val:.5f}", flush=True)

with open("checkpoint.json", "w") as f:
    json.dump({"lr": args.lr, "width": args.width, "val": val}, f)
