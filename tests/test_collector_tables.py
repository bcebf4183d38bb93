"""The collector on the post-DKD methods: published numbers tagged with their recipe, beside our runs.

Run directories are written here with known numbers (no training). Expected values are worked out
by hand below; the published numbers and recipes are typed from METHODS_NEW.md (and its CSV),
never taken from the collector itself.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from common.errors import UserError
from distiller.results import tables
from distiller.results.published import load_published

MLKD_TAG_480 = "480 ep, 2 views (RandAugment + Cutout), best epoch"
MLKD_TAG_960 = "960 ep, 2 views (RandAugment + Cutout), best epoch"
STANDARD_BEST = "240 ep, 1 view (crop + flip), best epoch"
STANDARD_UNSTATED = "240 ep, 1 view (crop + flip), best or last unstated"


def write_run(root: Path, teacher: str, student: str, name: str, seed: int, final: float, best: float,
              method: str | None = None, optim: str = "sgd", standardize: bool = False, epochs: int = 2,
              **distill: float) -> Path:
    """A finished run directory as the engine leaves it (config.yaml, .hydra/config.yaml, metrics.json)."""
    path = root / f"{teacher}-{student}" / f"{name}{'-ls' * standardize}-{optim}" / f"seed{seed}"
    (path / ".hydra").mkdir(parents=True)
    config = {"teacher": {"name": teacher}, "student": {"name": student}, "seed": seed, "combine": {},
              "distill": {"name": name, "method": method or name, "logit_standardize": standardize, **distill},
              "optim": {"name": optim}, "trainer": {"epochs": epochs}}
    for file in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        file.write_text(yaml.safe_dump(config))
    history = [{"epoch": e + 1, "test_top1": final if e == epochs - 1 else best, "test_top5": 90.0, "time_s": 36.0}
               for e in range(epochs)]
    (path / "metrics.json").write_text(json.dumps({"status": "finished", "final_top1": final, "best_top1": best,
                                                   "final_top5": 90.0, "epochs": history}))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # MLKD, resnet32x4 -> ShuffleV2: best 78, 79 (mean 78.5, sample std sqrt(0.5)); published 78.44 at 960 epochs
    write_run(root, "resnet32x4", "ShuffleV2", "mlkd", 0, 77.0, 78.0)
    write_run(root, "resnet32x4", "ShuffleV2", "mlkd", 1, 78.0, 79.0)
    # distill=kd distill.logit_standardize=true: grouped as kd_ls (KD+LS 76.62)
    write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 75.5, 76.0, standardize=True)
    # KD with DOT, once through the preset's label and once as distill=kd optim=dot: both kd_dot (75.12)
    write_run(root, "resnet32x4", "resnet8x4", "kd_dot", 0, 74.5, 75.0, method="kd", optim="dot")
    write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 75.0, 75.5, optim="dot")
    # plain KD stays kd (LS-KD README's KD baseline 73.33)
    write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 73.0, 73.5)
    # DIST, wrn_40_2 -> wrn_40_1: the DIST README's 74.43, not the TTM README's 74.73 for the same cell
    write_run(root, "wrn_40_2", "wrn_40_1", "dist", 0, 73.8, 74.0)
    # CTKD, resnet56 -> resnet20: 71.19 in both files; the CTKD README's row (protocol unstated) is shown
    write_run(root, "resnet56", "resnet20", "ctkd", 0, 70.5, 71.0)
    # NKD, resnet32x4 -> ShuffleV1: SDD's run 75.31, best epoch
    write_run(root, "resnet32x4", "ShuffleV1", "nkd", 0, 74.0, 75.0)
    return root


def rows_by_key(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(r["teacher"], r["student"], r["method"]): r for r in csv.DictReader(f)}


def test_every_published_row_is_tagged_with_its_recipe() -> None:
    published = load_published(["post_dkd"])
    assert len(published) == 185  # the CSV's rows: 112 LS-KD, 52 TTM, 6 DIST, 6 CTKD, 6 NKD, 3 KD+DOT
    mlkd = published[published["method"].isin(["mlkd", "mlkd_ls"])]
    assert len(mlkd) == 28 and (mlkd["views"] == 2).all() and (mlkd["protocol"] == "best").all()
    assert set(mlkd["augmentation"]) == {"RandAugment + Cutout"}
    long = mlkd[mlkd["epochs"] == 960]
    assert set(zip(long["teacher"], long["student"])) == {("resnet32x4", "ShuffleV2")} and len(long) == 2
    assert (mlkd[mlkd["epochs"] != 960]["epochs"] == 480).all()
    assert set(mlkd["recipe"]) == {MLKD_TAG_480, MLKD_TAG_960}
    others = published[~published["method"].isin(["mlkd", "mlkd_ls"])]
    assert (others["epochs"] == 240).all() and (others["views"] == 1).all()
    # best epoch: the LS-KD README (112), mdistiller's DOT rows (3), SDD's NKD runs (6); unstated: the rest
    assert (published["protocol"] == "best").sum() == 121 and (published["protocol"] == "unstated").sum() == 64
    assert set(published["method"]) == {"kd", "dkd", "dist", "kd_ls", "dkd_ls", "ctkd", "ctkd_ls", "mlkd",
                                        "mlkd_ls", "kd_dot", "ttm", "wttm", "wttm+crd", "nkd"}


def test_our_runs_beside_the_published_numbers_and_their_recipes(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report" / "new"
    rows, found = tables.collect([str(runs)], out, sources=["post_dkd"], figure=False)
    assert len(found) == 9
    by_key = rows_by_key(out.with_suffix(".csv"))

    mlkd = by_key[("resnet32x4", "ShuffleV2", "mlkd")]
    assert mlkd["runs"] == "2" and float(mlkd["best_top1_mean"]) == pytest.approx(78.5)
    assert float(mlkd["best_top1_std"]) == pytest.approx(math.sqrt(0.5), abs=1e-4)
    assert float(mlkd["post_dkd_published"]) == pytest.approx(78.44)
    assert float(mlkd["post_dkd_diff"]) == pytest.approx(78.5 - 78.44, abs=1e-4)
    assert mlkd["post_dkd_recipe"] == MLKD_TAG_960 and mlkd["post_dkd_protocol"] == "best"

    kd_ls = by_key[("resnet32x4", "resnet8x4", "kd_ls")]
    assert kd_ls["runs"] == "1" and float(kd_ls["post_dkd_published"]) == pytest.approx(76.62)
    assert float(kd_ls["post_dkd_diff"]) == pytest.approx(76.0 - 76.62, abs=1e-4)
    assert kd_ls["post_dkd_recipe"] == STANDARD_BEST

    kd_dot = by_key[("resnet32x4", "resnet8x4", "kd_dot")]  # best 75.0 and 75.5: mean 75.25, std sqrt(0.125)
    assert kd_dot["runs"] == "2" and float(kd_dot["best_top1_mean"]) == pytest.approx(75.25)
    assert float(kd_dot["best_top1_std"]) == pytest.approx(math.sqrt(0.125), abs=1e-4)
    assert float(kd_dot["post_dkd_published"]) == pytest.approx(75.12)

    kd = by_key[("resnet32x4", "resnet8x4", "kd")]
    assert kd["runs"] == "1" and float(kd["post_dkd_published"]) == pytest.approx(73.33)

    dist = by_key[("wrn_40_2", "wrn_40_1", "dist")]
    assert float(dist["post_dkd_published"]) == pytest.approx(74.43)  # the authors' own README
    assert dist["post_dkd_recipe"] == STANDARD_UNSTATED
    assert float(dist["post_dkd_diff"]) == pytest.approx(74.0 - 74.43, abs=1e-4)  # unstated: against our best

    ctkd = by_key[("resnet56", "resnet20", "ctkd")]
    assert float(ctkd["post_dkd_published"]) == pytest.approx(71.19) and ctkd["post_dkd_recipe"] == STANDARD_UNSTATED

    nkd = by_key[("resnet32x4", "ShuffleV1", "nkd")]
    assert float(nkd["post_dkd_published"]) == pytest.approx(75.31) and nkd["post_dkd_recipe"] == STANDARD_BEST
    assert float(nkd["post_dkd_diff"]) == pytest.approx(-0.31, abs=1e-4)

    row = next(r for r in rows if (r.student, r.method) == ("ShuffleV2", "mlkd"))
    assert row.published == {"post_dkd": 78.44} and row.recipes == {"post_dkd": MLKD_TAG_960}

    markdown = out.with_suffix(".md").read_text()
    assert "| post-DKD papers | Δ (best) | post-DKD papers: recipe |" in markdown
    assert f"| mlkd | 2 | 77.50 ± 0.71 | 78.50 ± 0.71 | 78.44 | +0.06 | {MLKD_TAG_960} |" in markdown


def test_a_published_table_lays_out_the_new_methods_with_their_recipes(runs: Path, tmp_path: Path) -> None:
    """--table lskd_same_arch: the LS paper's 7 pairs x 8 methods (KD, KD+LS, CTKD, CTKD+LS, DKD, DKD+LS,
    MLKD, MLKD+LS), also the cells not run yet, each with its recipe, plus our other methods on its pairs."""
    rows, _ = tables.collect([str(runs)], tmp_path / "lskd", sources=["post_dkd"], tables=["lskd_same_arch"],
                         figure=False)
    assert len(rows) == 7 * 8 + 2  # + kd_dot on resnet32x4 -> resnet8x4 and dist on wrn_40_2 -> wrn_40_1
    cells = {(r.teacher, r.student, r.method): r for r in rows}
    mlkd = cells[("resnet32x4", "resnet8x4", "mlkd")]
    assert mlkd.published["post_dkd"] == 77.08 and mlkd.recipes["post_dkd"] == MLKD_TAG_480 and mlkd.last.n == 0
    assert cells[("resnet110", "resnet20", "kd_ls")].published["post_dkd"] == 71.48
    assert cells[("resnet56", "resnet20", "dkd_ls")].published["post_dkd"] == 72.32
    assert cells[("resnet32x4", "resnet8x4", "kd_ls")].best.mean == 76.0  # our run, in its table cell


def test_cli_shows_the_post_dkd_column_by_default(runs: Path, tmp_path: Path) -> None:
    result = run_cli("scripts/collect_results.py", str(runs), "--out", str(tmp_path / "cli"), "--no-figure")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "post-DKD papers: recipe" in out and MLKD_TAG_960 in out
    assert "| CRD paper |" in out  # the earlier sources stay


def test_cells_run_with_settings_other_than_the_published_ones_are_flagged(tmp_path: Path) -> None:
    """WTTM/TTM's per-pair gamma and beta are unknown except the TTM README's vgg13 -> vgg8 command (gamma 0.1,
    beta 45, CE 1, KD 0): every other WTTM/TTM cell carries the flag, in the CSV, the Markdown and the rows."""
    root = tmp_path / "runs"
    readme = {"power": 0.1, "beta": 45.0, "gamma": 1.0, "alpha": 0.0}  # TTM README: --ttm_l 0.1 -b 45 -r 1 -a 0
    write_run(root, "vgg13", "vgg8", "ttm", 0, 74.0, 74.2, **readme)
    write_run(root, "vgg13", "vgg8", "ttm", 1, 74.1, 74.3, **readme)
    write_run(root, "resnet56", "resnet20", "ttm", 0, 71.0, 71.2, **readme)  # the example, on another pair
    write_run(root, "wrn_40_2", "wrn_16_2", "wttm", 0, 75.0, 75.5, power=0.2, beta=4.0, gamma=1.0, alpha=0.0)
    write_run(root, "vgg13", "vgg8", "wttm", 0, 74.0, 74.4, power=0.2, beta=4.0, gamma=1.0, alpha=0.0)
    write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 73.0, 73.5)  # no per-pair settings in question
    # distill=ctkd_ls (the new-methods table's CTKD+LS row): the LS README's 76.67 beside it, not flagged
    write_run(root, "resnet32x4", "resnet8x4", "ctkd_ls", 0, 76.0, 76.5, method="ctkd", standardize=True)
    out = tmp_path / "flags"
    rows, _ = tables.collect([str(root)], out, sources=["post_dkd"], figure=False)
    by_key = rows_by_key(out.with_suffix(".csv"))
    assert by_key[("vgg13", "vgg8", "ttm")]["settings"] == "" and by_key[("vgg13", "vgg8", "ttm")]["runs"] == "2"
    assert by_key[("resnet32x4", "resnet8x4", "kd")]["settings"] == ""
    ctkd_ls = by_key[("resnet32x4", "resnet8x4", "ctkd_ls")]
    assert float(ctkd_ls["post_dkd_published"]) == pytest.approx(76.67) and ctkd_ls["settings"] == ""
    flagged = {("resnet56", "resnet20", "ttm"): "ttm: per-pair gamma/beta of the paper's appendix A.4 unknown, "
                                                "ran power 0.1, beta 45.0",
               ("wrn_40_2", "wrn_16_2", "wttm"): "wttm: per-pair gamma/beta of the paper's appendix A.4 unknown, "
                                                 "ran power 0.2, beta 4.0",
               ("vgg13", "vgg8", "wttm"): "wttm: per-pair gamma/beta of the paper's appendix A.4 unknown, "
                                          "ran power 0.2, beta 4.0"}
    for cell, why in flagged.items():
        assert by_key[cell]["settings"] == f"NOT_PUBLISHED_SETTINGS: {why}", cell
    cells = {(r.teacher, r.student, r.method): r for r in rows}
    assert cells[("resnet56", "resnet20", "ttm")].settings.startswith("NOT_PUBLISHED_SETTINGS")
    assert cells[("vgg13", "vgg8", "ttm")].settings == ""
    markdown = out.with_suffix(".md").read_text()
    assert "| our recipe | settings |" in markdown
    assert markdown.count("NOT_PUBLISHED_SETTINGS: ") == 3

    # a run of the README cell with another beta trained something else: never averaged with the README's runs,
    # and collected alone it is flagged, naming the published values
    other_beta = write_run(root, "vgg13", "vgg8", "ttm", 2, 73.0, 73.5, **{**readme, "beta": 30.0})
    with pytest.raises(UserError, match="the runs of ttm on vgg13 → vgg8 differ in distill.beta and cannot be "
                                        "averaged: distill.beta 30 \\(1 run, "):
        tables.collect([str(root)], out, sources=["post_dkd"], figure=False)
    tables.collect([str(other_beta)], out, sources=["post_dkd"], figure=False)
    ttm = rows_by_key(out.with_suffix(".csv"))[("vgg13", "vgg8", "ttm")]
    assert ttm["settings"] == ("NOT_PUBLISHED_SETTINGS: ttm: ran power 0.1, beta 30.0, gamma 1.0, alpha 0.0, "
                               "published power 0.1, beta 45, gamma 1, alpha 0")
