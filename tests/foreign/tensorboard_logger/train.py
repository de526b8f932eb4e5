"""Logs scalars to TensorBoard under ./runs, prints a progress line now and then."""

import argparse

from tensorboard.summary import Writer

p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--epochs", type=int, default=5)
a = p.parse_args()
writer = Writer("runs/exp")
for epoch in range(a.epochs):
    val = (a.lr - 0.05) ** 2 + 0.1 / (epoch + 1)
    writer.add_scalar("loss/val", val, step=epoch)
    writer.add_scalar("loss/train", val * 0.9, step=epoch)
    if epoch % 2 == 0:
        print(f"[{epoch}] logged")
writer.close()
