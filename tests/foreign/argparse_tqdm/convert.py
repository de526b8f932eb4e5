"""The team's converter from its rollout file to the competition's pred.hdf5."""

import h5py


def to_pred_hdf5(src, dest):
    with h5py.File(src, "r") as f_in, h5py.File(dest, "w") as f_out:
        f_out["pred"] = f_in["u_pred"][...]
