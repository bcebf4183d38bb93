"""The methods_2025 table: its sweep lists its cells, and the collector reads the published numbers with their recipes.

Counts and numbers are typed from METHODS_2025_*.md and its CSV (paper_tables/methods_2025.csv): 13 pairs x
14 methods x 5 seeds on the standard recipe, SKD on its 6 pairs and WKD on its 2 under their published
recipes. A number whose source is SECONDARY (quoted by a third party) backs no 'paper' preset.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from distiller.results import published, tables
from scripts import sweep_table

PAPER_PRESETS = ("methods_2025_skd_paper", "methods_2025_wkd_paper", "methods_2025_wkd_lf_paper")


def test_dry_run_lists_every_cell_of_the_table(capsys) -> None:
    assert sweep_table.main(["methods_2025", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# experiment=methods_2025_standard: 910 runs" in out
    assert "# experiment=methods_2025_skd_paper: 30 runs" in out
    assert "# experiment=methods_2025_wkd_paper: 20 runs" in out
    assert "# experiment=methods_2025_wkd_lf_paper: 10 runs" in out
    assert "# methods_2025: 970 runs in all" in out
    assert "  pair=ResNet50-vgg8 distill=sdd_nkd seed=4" in out and "  pair=vgg13-vgg8 seed=0" in out
    assert "$ " + str(REPO / "train_student.py") + " -m experiment=methods_2025_skd_paper" in out


def published_2025():
    return published.load_published(["methods_2025"])


def test_every_published_number_is_read_and_tagged_with_its_recipe() -> None:
    frame = published_2025().set_index(["teacher", "student", "method"])
    assert len(frame) == 49
    assert frame.loc[("resnet32x4", "resnet8x4", "luminet"), "top1"] == 77.50
    skd = frame.loc[("resnet32x4", "resnet8x4", "skd")]
    assert skd["top1"] == 78.33 and "lr 0.1" in skd["recipe"] and "own teachers" in skd["recipe"]
    assert not skd["secondary"] and skd["recipe"].startswith("240 ep, 1 view (crop + flip), best epoch")
    wkd = frame.loc[[("wrn_40_2", "ShuffleV1", "wkd_l")]]
    assert set(wkd["top1"]) == {76.72} and all("Nesterov" in r for r in wkd["recipe"])
    assert frame.loc[("resnet32x4", "ShuffleV2", "sdd_dkd"), "recipe"] == "240 ep, 1 view (crop + flip), best epoch"
    mld = frame.loc[("resnet32x4", "resnet8x4", "eakd_mlkd_ls")]
    assert mld["epochs"] == 480 and mld["views"] == 2 and mld["secondary"]
    secondary = set(published_2025().loc[lambda f: f["secondary"], "method"])
    assert secondary == {"rld", "eakd", "eakd_fcfd", "eakd_mlkd_ls", "cat_kd"}
    assert all(published.SECONDARY_NOTE in r for r in published_2025().loc[lambda f: f["secondary"], "recipe"])


def test_no_secondary_number_backs_a_paper_preset(compose) -> None:
    published = published_2025()
    for preset in PAPER_PRESETS:
        label = compose("train_student", [f"experiment={preset}"]).method_label  # where the preset sweeps no distill
        for job in sweep_table.expand_preset(preset):
            teacher, student = job["pair"].split("-")
            method = job.get("distill", label)
            rows = published[(published["teacher"] == teacher) & (published["student"] == student)
                             & (published["method"] == method)]
            assert len(rows) and not rows["secondary"].any(), (preset, job)


def write_run(root: Path, teacher: str, student: str, name: str, seed: int, best: float, lr: float) -> None:
    """A finished run directory as the engine leaves it (config.yaml, metrics.json)."""
    path = root / f"{teacher}-{student}" / name / f"seed{seed}"
    path.mkdir(parents=True)
    config = {"teacher": {"name": teacher}, "student": {"name": student}, "seed": seed, "combine": {},
              "method_label": name, "distill": {"name": name, "method": name}, "optim": {"name": "sgd", "lr": lr},
              "trainer": {"epochs": 2}, "schedule": {"name": "step", "gamma": 0.1, "milestones": [1]}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    history = [{"epoch": e + 1, "test_top1": best - 1 + e, "test_top5": 90.0, "time_s": 1.0} for e in range(2)]
    (path / "metrics.json").write_text(json.dumps({"status": "finished", "final_top1": best, "best_top1": best,
                                                   "final_top5": 90.0, "epochs": history}))


def test_collector_puts_the_paper_recipe_run_beside_its_published_number(tmp_path: Path) -> None:
    runs = tmp_path / "paper"
    write_run(runs, "resnet32x4", "resnet8x4", "skd", 0, 78.0, lr=0.1)
    write_run(runs, "resnet32x4", "resnet8x4", "skd", 1, 79.0, lr=0.1)
    out = tmp_path / "report" / "m25"
    tables.collect([str(runs)], out, sources=["methods_2025"], figure=False)
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = {(r["teacher"], r["student"], r["method"]): r for r in csv.DictReader(f)}
    skd = rows[("resnet32x4", "resnet8x4", "skd")]
    assert float(skd["best_top1_mean"]) == pytest.approx(78.5) and float(skd["methods_2025_published"]) == 78.33
    assert float(skd["methods_2025_diff"]) == pytest.approx(78.5 - 78.33, abs=1e-4)
    assert "lr 0.1" in skd["methods_2025_recipe"] and "lr 0.1" in skd["our_recipe"]
    assert "2023-26 papers: recipe" in out.with_suffix(".md").read_text()
