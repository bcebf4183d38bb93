"""Distill a teacher into a student: loss = gamma * CE + alpha * KD + beta * method.

    python train_student.py teacher=resnet32x4 student=resnet8x4 distill=kd
    python train_student.py teacher=resnet32x4 teacher.ckpt=PATH student=resnet8x4 distill=crd distill.beta=0.8
    python train_student.py -m distill=kd,fitnet,at seed=0,1,2
"""
import sys

import hydra
from omegaconf import DictConfig

from distiller.config.command_line import report_user_errors
from distiller.config.preflight import preflight
from distiller.jobs.train import distill, run_dir_of_job


@hydra.main(config_path="configs", config_name="train_student", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    final = distill(cfg, run_dir_of_job())
    return None if final is None else final["test_top1"]


if __name__ == "__main__":
    preflight("train_student", sys.argv[1:])
    main()
