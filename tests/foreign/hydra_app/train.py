"""A Hydra app as PDE benchmark code writes it: a config group picks the PDE, Hydra moves
into its run folder (outputs/<time>) and the checkpoint lands there."""

import json
import logging
import math
import time

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    a = cfg.args
    for epoch in range(1, a.epochs + 1):
        err = abs(math.log10(a.learning_rate) + 2) + a.beta / (a.modes * epoch)
        time.sleep(0.1)  # an epoch of training
        log.info("Epoch: %d  Train L2: %.5f  Val nRMSE: %.5f", epoch, err * 0.9, err)
    with open("model.ckpt", "w") as f:
        json.dump({"lr": a.learning_rate, "modes": a.modes, "err": err}, f)


if __name__ == "__main__":
    main()
