"""Train a CIFAR-100 network with cross-entropy (a teacher, or a student baseline).

    python train_teacher.py model=resnet32x4
    python train_teacher.py model=resnet8 dataset=synthetic trainer.epochs=5
"""
import sys

import hydra
from omegaconf import DictConfig

from distiller.config.command_line import report_user_errors
from distiller.config.preflight import preflight
from distiller.jobs.train import run_dir_of_job, train_network


@hydra.main(config_path="configs", config_name="train_teacher", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    final = train_network(cfg, run_dir_of_job())
    return None if final is None else final["test_top1"]


if __name__ == "__main__":
    preflight("train_teacher", sys.argv[1:])
    main()
