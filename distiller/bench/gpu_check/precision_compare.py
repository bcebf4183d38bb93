"""fp32 against bf16 on the same seeds: one row that says, per seed, how far bf16 autocast moved the student's
top-1 from fp32's (same teacher, same data, same seed), and on average. The evidence behind training the
table presets in fp32 while ordinary runs default to bf16 on CUDA (``trainer.precision=auto``)."""
from __future__ import annotations

import statistics

from distiller.bench.gpu_check.rows import OK, SKIPPED, Row


def _signed(values: list[float]) -> str:
    return ", ".join(f"{v:+.2f}" for v in values)


def precision_comparison(rows: list[Row], base: str = "fp32", other: str = "bf16") -> Row:
    """The comparison row of the accuracy runs in ``rows`` (:func:`~.training_steps.accuracy_runs`' rows, whose
    ``extra`` names the variant ``label`` and the ``seed``): ``other`` minus ``base`` per seed both finished,
    for the last and the best epoch's top-1, and their means. Skipped when no seed finished in both."""
    runs = {(r.extra["label"], r.extra["seed"]): r.extra for r in rows if r.status == OK and "label" in r.extra}
    seeds = sorted({s for label, s in runs if label == base} & {s for label, s in runs if label == other})
    if not seeds:
        return Row("accuracy", f"{base} vs {other}", SKIPPED, detail=f"no seed finished in both {base} and {other}")
    first = runs[(base, seeds[0])]
    final = {label: [runs[(label, s)]["final_top1"] for s in seeds] for label in (base, other)}
    best = {label: [runs[(label, s)]["best_top1"] for s in seeds] for label in (base, other)}
    final_diff = [o - b for b, o in zip(final[base], final[other])]
    best_diff = [o - b for b, o in zip(best[base], best[other])]
    mean = statistics.fmean
    return Row("accuracy", f"{first['case']} {base} vs {other}, {first['epochs']} epochs, seeds "
                           f"{','.join(map(str, seeds))}, {first['data']}", OK,
               accuracy=f"{base} {mean(final[base]):.2f} / {other} {mean(final[other]):.2f} (mean)",
               detail=f"{other} - {base} per seed: {_signed(final_diff)} (mean {mean(final_diff):+.2f}); best "
                      f"epoch {_signed(best_diff)} (mean {mean(best_diff):+.2f})",
               extra={"seeds": seeds, "base": base, "other": other, "final_top1": final, "best_top1": best,
                      "final_diff": final_diff, "best_diff": best_diff, "mean_final_diff": mean(final_diff),
                      "mean_best_diff": mean(best_diff)})
