"""The published numbers beside which our runs are shown: their sources (paper_tables/*.csv), the papers'
method names in ours, and the recipe behind each number (epochs, views, augmentation, best or last epoch)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from common.errors import UserError

PAPER_TABLES = Path(__file__).resolve().parents[2] / "scripts" / "paper_tables"  # the CSV files


@dataclass(frozen=True)
class Source:
    """One file of published numbers and the evaluation protocol behind them."""

    key: str
    file: str
    label: str
    protocol: str  # "last" | "best": the protocol its numbers are compared under
    recipes: bool = False  # the file's rows differ in recipe: show each number's recipe beside it
    dataset: str = "cifar100"  # the data set (dataset.name) its numbers were measured on

    def dataset_of(self, table: str) -> str:
        """The data set of one of the file's tables (Tiny-ImageNet runs here as an image folder)."""
        return TABLE_DATASETS.get(table, self.dataset)


SOURCES: dict[str, Source] = {
    # the ImageNet and Tiny-ImageNet tables (per-row protocol; not in the shared notes): --sources imagenet
    "imagenet": Source("imagenet", "imagenet_tables.csv", "ImageNet papers", "best", dataset="imagenet"),
    "crd": Source("crd", "crd_paper_repdistiller_readme.csv", "CRD paper", "last"),
    "dkd": Source("dkd", "dkd_paper.csv", "DKD paper", "best"),
    "mdistiller": Source("mdistiller", "mdistiller_readme.csv", "mdistiller README", "best"),
    # per-row protocol in the file (best, or unstated where the authors' code tracks the best epoch)
    "post_dkd": Source("post_dkd", "post_dkd_methods.csv", "post-DKD papers", "best", recipes=True),
    # the methods of 2023-2026 (METHODS_2025_*.md): the authors' trainers keep the best epoch
    "methods_2025": Source("methods_2025", "methods_2025.csv", "2023-26 papers", "best", recipes=True),
}
DEFAULT_SOURCES = ("crd", "dkd", "post_dkd")
# Tables measured on another data set than their file's: Tiny-ImageNet is trained as dataset=imagefolder.
TABLE_DATASETS = {"tiny_imagenet_dot": "imagefolder"}

# The papers' method names -> our config names (configs/distill/<name>.yaml). Explicit on purpose:
# a new spelling in a data file must be added here, not guessed.
PAPER_METHOD_NAMES: dict[str, str] = {
    "teacher": "teacher", "student": "student",
    "KD": "kd", "FitNet": "fitnet", "AT": "at", "SP": "sp", "CC": "cc", "VID": "vid", "RKD": "rkd",
    "PKT": "pkt", "AB": "ab", "FT": "ft", "FSP": "fsp", "NST": "nst", "CRD": "crd", "CRD+KD": "crd_kd",
    "OFD": "ofd", "ReviewKD": "reviewkd", "DKD": "dkd", "KDSVD": "kdsvd",
    "KD+DOT": "kd_dot",  # KD trained with the DOT optimizer (experiment=new_methods_table_dot)
    "DIST": "dist", "KD+LS": "kd_ls", "DKD+LS": "dkd_ls", "CTKD": "ctkd", "CTKD+LS": "ctkd_ls", "MLKD": "mlkd",
    "MLKD+LS": "mlkd_ls", "TTM": "ttm", "WTTM": "wttm", "WTTM+CRD": "wttm+crd", "NKD": "nkd",
    # the methods of 2023-2026 (EA-FCFD and EA-MLD+LS have no config here: FCFD and EA on MLKD are not implemented)
    "RLD": "rld", "LumiNet": "luminet", "SKD": "skd", "ABKD": "abkd", "EA-KD (on KD)": "eakd", "EA-DKD": "eakd_dkd",
    "EA-FCFD": "eakd_fcfd", "EA-MLD+LS": "eakd_mlkd_ls", "NormKD": "normkd", "NormKD+DKD": "normkd_dkd",
    "WKD-L": "wkd_l", "WKD-F": "wkd_f", "WKD-L+WKD-F": "wkd_l+wkd_f", "SD-KD": "sdd_kd", "SD-DKD": "sdd_dkd",
    "SD-NKD": "sdd_nkd", "CAT-KD": "cat_kd",
}

# Row order inside a pair: baselines, then the CRD paper's column order, then the DKD paper's additions.
METHOD_ORDER = ["teacher", "student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
                "fsp", "nst", "crd", "crd_kd", "ofd", "reviewkd", "dkd", "kdsvd", "kd_dot",
                "dist", "kd_ls", "dkd_ls", "ctkd", "ctkd_ls", "mlkd", "mlkd_ls", "ttm", "wttm", "wttm+crd", "nkd",
                "rld", "luminet", "skd", "abkd", "eakd", "eakd_dkd", "eakd_fcfd", "eakd_mlkd_ls", "normkd",
                "normkd_dkd", "wkd_l", "wkd_f", "wkd_l+wkd_f", "sdd_kd", "sdd_dkd", "sdd_nkd", "cat_kd"]
BASELINES = ("teacher", "student")  # rows filled from plain cross-entropy runs of one architecture

# Short names for the published tables (--table), next to the ids used in the CSV files.
TABLE_ALIASES = {
    "crd_table1": "crd_table1_same_arch", "crd_table2": "crd_table2_cross_arch",
    "dkd_same": "dkd_same_arch", "dkd_cross": "dkd_cross_arch",
}

FINISHED = "finished"
CELL = ["teacher", "student", "method"]
MISSING = "–"
# data_folder: an image folder's root (another folder is another data set); settings: NOT_PUBLISHED_SETTINGS and
# why, when our runs departed (results.settings)
SUMMARY_COLUMNS = ["dataset", "data_folder", "teacher", "student", "method", "runs", "last_top1_mean",
                   "last_top1_std", "best_top1_mean", "best_top1_std", "not_finished", "hours_per_run", "seeds",
                   "our_recipe", "settings"]


# ---- published recipes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How a published number was trained and read off (METHODS_NEW.md, per method)."""

    epochs: int
    views: int  # augmented views of each image per step (each one a forward of both networks)
    augmentation: str
    protocol: str  # "best" | "last" | "unstated" (epoch the number was read at)
    note: str = ""  # what else departs from the standard recipe, and whether the source is secondary

    def tag(self) -> str:
        views = f"{self.views} view" + ("s" if self.views > 1 else "")
        read = {"best": "best epoch", "last": "last epoch"}.get(self.protocol, "best or last unstated")
        return f"{self.epochs} ep, {views} ({self.augmentation}), {read}" + (f"; {self.note}" if self.note else "")


STANDARD_AUGMENTATION = "crop + flip"
# MLKD's released recipe (MLKD+LS too): a weak and a strong view, 480 epochs (960 for resnet32x4 ->
# ShuffleV1/V2 from its commit 77b91ec), lr 0.025 (0.01 mobile), decays still at 150/180/210, best epoch.
TWO_VIEW_METHODS = {"MLKD", "MLKD+LS", "EA-MLD+LS"}
TWO_VIEW_AUGMENTATION = "RandAugment + Cutout"
LONG_SCHEDULE_PAIRS = {("resnet32x4", "ShuffleV1"): 960, ("resnet32x4", "ShuffleV2"): 960}
# where one cell is in several tables of a file, the method's own authors' number is shown
OWN_TABLES = {"DIST": "dist_readme", "CTKD": "ctkd_readme"}
# The methods of 2023-2026 whose published recipe departs from the standard one besides epochs and views,
# and the 'paper' preset that re-runs it (METHODS_2025_LOGIT.md sections 3 and 7). A number whose source is
# SECONDARY (quoted by a third party, unchecked against the paper) backs no 'paper' preset.
RECIPE_DEPARTURES = {
    "SKD": "lr 0.1, the authors' own teachers (experiment=methods_2025_skd_paper)",
    "WKD-L": "Nesterov, fp16 AMP (experiment=methods_2025_wkd_paper)",
    "WKD-F": "Nesterov, fp16 AMP (experiment=methods_2025_wkd_paper)",
    "WKD-L+WKD-F": "Nesterov, fp16 AMP (experiment=methods_2025_wkd_lf_paper)",
    "EA-FCFD": "FCFD's recipe (not implemented here)",
}
SECONDARY = "SECONDARY"
SECONDARY_NOTE = "secondary source, unverified: backs no paper preset"


def published_recipe(method: str, teacher: str, student: str, protocol: str, secondary: bool = False) -> Recipe:
    """The recipe behind one published number: ``method`` in the paper's spelling, ``protocol`` the file's text;
    ``secondary``: the number comes from a secondary source (said in the tag)."""
    read = next((p for p in ("best", "last") if protocol.strip().lower().startswith(p)), "unstated")
    note = "; ".join(x for x in (RECIPE_DEPARTURES.get(method, ""), SECONDARY_NOTE if secondary else "") if x)
    if method in TWO_VIEW_METHODS:
        return Recipe(LONG_SCHEDULE_PAIRS.get((teacher, student), 480), 2, TWO_VIEW_AUGMENTATION, read, note)
    return Recipe(240, 1, STANDARD_AUGMENTATION, read, note)


# ---- published numbers -----------------------------------------------------------------------------
PUBLISHED_COLUMNS = ["source", "table", "dataset", *CELL, "top1", "epochs", "views", "augmentation", "protocol",
                     "recipe", "preferred", "secondary"]


def load_published(sources: Sequence[str] = tuple(SOURCES), folder: Path = PAPER_TABLES) -> pd.DataFrame:
    """Published top-1, one row per (source, table, teacher, student, method) in file order, our method names,
    the data set it was measured on (``dataset``, as ``dataset.name`` names it), each with its recipe
    (``epochs``, ``views``, ``augmentation``, ``protocol``, and all four as ``recipe``)."""
    frames = []
    for key in sources:
        if key not in SOURCES:
            raise UserError(f"unknown source '{key}'; choose from {', '.join(SOURCES)}")
        source = SOURCES[key]
        frame = pd.read_csv(folder / source.file, dtype={"top1": float})
        if "table" not in frame:  # a file of one table (methods_2025.csv): the source names it
            frame["table"] = key
        secondary = (frame["source"].astype(str).str.strip().str.startswith(SECONDARY) if "source" in frame
                     else pd.Series(False, index=frame.index))
        for column in ("table", "teacher", "student", "method"):
            frame[column] = frame[column].str.strip()
        unknown = frame.loc[~frame["method"].isin(list(PAPER_METHOD_NAMES)), "method"]
        if len(unknown):
            raise UserError(f"{source.file}: method '{unknown.iloc[0]}' has no mapping to our config names; "
                            f"add it to PAPER_METHOD_NAMES in distiller/results/published.py")
        protocols = frame["protocol"].astype(str) if "protocol" in frame else [source.protocol] * len(frame)
        recipes = [published_recipe(m, t, s, p, bool(x)) for m, t, s, p, x in
                   zip(frame["method"], frame["teacher"], frame["student"], protocols, secondary)]
        frames.append(frame.assign(
            source=key, dataset=[source.dataset_of(t) for t in frame["table"]],
            epochs=[r.epochs for r in recipes], views=[r.views for r in recipes],
            augmentation=[r.augmentation for r in recipes], protocol=[r.protocol for r in recipes],
            recipe=[r.tag() for r in recipes],
            preferred=[OWN_TABLES.get(m) == t for m, t in zip(frame["method"], frame["table"])],
            secondary=secondary.astype(bool),
            method=frame["method"].map(PAPER_METHOD_NAMES)))
    if not frames:
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    return pd.concat(frames, ignore_index=True)[PUBLISHED_COLUMNS]


def table_cells(published: pd.DataFrame, tables: Sequence[str]) -> pd.DataFrame:
    """The (teacher, student, method) cells of the named published tables, in the papers' order."""
    known = set(published["table"])
    cells = []
    for name in tables:
        table_id = TABLE_ALIASES.get(name, name)
        if table_id not in known:
            everywhere = load_published()
            holders = sorted(set(everywhere.loc[everywhere["table"] == table_id, "source"]))
            if holders:  # a table of a published source not chosen with --sources
                loaded = sorted(set(published["source"]))
                raise UserError(f"table '{name}' is in the published source {' and '.join(holders)}, which is not "
                                f"loaded: add it with --sources {','.join([*loaded, *holders])}")
            raise UserError(f"unknown table '{name}'; choose from {', '.join(sorted(known | set(TABLE_ALIASES)))}")
        cells.append(published.loc[published["table"] == table_id, CELL])
    return pd.concat(cells).drop_duplicates(ignore_index=True)
