"""``scripts/evaluate.py``: any checkpoint layout, against a naive per-image loop written here.

The network is resnet8 trained for a few SGD steps here (so its predictions are spread over
classes, not a constant), saved in our layout, the older frameworks' ``{'model': sd}`` layout and
as a plain ``module.``-prefixed state dict. The reference evaluates one image at a time in
float64 with its own normalisation, top-k and per-class bookkeeping.

Tolerance: the evaluator runs in float32 on batches, the reference in float64 per image. Their
logits differ by float32 rounding (relative ~1e-6 over a few thousand accumulated terms, far
below 1e-3 for logits of order 1-10), so a top-1 or top-5 decision can only differ for an image
whose deciding logit gap (between rank k and k+1) is below ``AMBIGUOUS_GAP`` = 1e-3. The counts
must agree up to the number of such images (zero in practice); the mean loss to 1e-4.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_cli, seed

from common.errors import UserError
from datasets import load_dataset
from distiller.jobs.evaluate import evaluate_checkpoint, load_checkpoint
from distiller.jobs.teacher_accuracy import PUBLISHED_TOLERANCE, published_check
from models import build_model

TRAIN, TEST, CLASSES = 400, 300, 100
AMBIGUOUS_GAP = 1e-3


def data_cfg(root: Path) -> dict:
    return {"name": "synthetic", "root": str(root), "train_size": TRAIN, "test_size": TEST, "seed": 0,
            "num_classes": CLASSES, "batch_size": 64, "eval_batch_size": 128}


def data_overrides(root: Path) -> list[str]:
    return ["dataset=synthetic", f"dataset.root={root}", f"dataset.train_size={TRAIN}", f"dataset.test_size={TEST}",
            "dataset.eval_batch_size=128", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The same trained resnet8 in the three layouts, and the data it is evaluated on."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data = load_dataset(data_cfg(tmp / "data"))
    torch.manual_seed(seed(3))
    model = build_model("resnet8", num_classes=CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(seed(4))
    model.train()
    for _ in range(30):
        idx = torch.randint(0, TRAIN, (64,), generator=gen)
        x = (data.train_images[idx].float() / 255 - mean) / std
        loss = torch.nn.functional.cross_entropy(model(x), data.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.state_dict()
    paths = {"ours": tmp / "final.pt", "model-dict": tmp / "ckpt_epoch_240.pth", "state-dict": tmp / "plain.pth"}
    torch.save({"model": state, "arch": "resnet8", "num_classes": CLASSES, "epoch": 1, "accuracy": 1.0,
                "config": {"dataset": data_cfg(Path("elsewhere"))}}, paths["ours"])
    torch.save({"model": state, "epoch": 240, "accuracy": 1.0}, paths["model-dict"])
    torch.save({f"module.{k}": v for k, v in state.items()}, paths["state-dict"])
    return {"paths": paths, "state": state, "data": data, "root": tmp / "data", "tmp": tmp}


def naive(state: dict, data) -> dict:
    """Per image, float64: hits, per-class hits, mean loss, and how many decisions are within AMBIGUOUS_GAP."""
    model = build_model("resnet8", num_classes=CLASSES).double()
    model.load_state_dict(state)
    model.eval()
    hit1, hit5, count = [0] * CLASSES, [0] * CLASSES, [0] * CLASSES
    loss, ambiguous = 0.0, 0
    with torch.no_grad():
        for image, label in zip(data.test_images, data.test_labels.tolist()):
            x = image.double() / 255.0
            for c in range(3):
                x[c] = (x[c] - data.mean[c]) / data.std[c]
            logits = model(x[None])[0].tolist()
            order = sorted(range(CLASSES), key=lambda k: -logits[k])
            count[label] += 1
            hit1[label] += order[0] == label
            hit5[label] += label in order[:5]
            top = max(logits)
            loss += -(logits[label] - top - math.log(sum(math.exp(v - top) for v in logits)))
            ranked = sorted(logits, reverse=True)
            ambiguous += (ranked[0] - ranked[1] < AMBIGUOUS_GAP) + (ranked[4] - ranked[5] < AMBIGUOUS_GAP)
    n = sum(count)
    return {"hit1": hit1, "hit5": hit5, "count": count, "loss": loss / n, "ambiguous": ambiguous, "n": n}


@pytest.fixture(scope="module")
def reference(files) -> dict:
    return naive(files["state"], files["data"])


def check_against(result: dict, ref: dict) -> None:
    n = ref["n"]
    assert result["num_images"] == n == TEST
    assert result["per_class_count"] == ref["count"]
    slack = ref["ambiguous"]
    assert abs(result["test_top1"] * n / 100 - sum(ref["hit1"])) <= slack + 1e-6
    assert abs(result["test_top5"] * n / 100 - sum(ref["hit5"])) <= slack + 1e-6
    for c in range(CLASSES):
        for key, hits in (("per_class_top1", ref["hit1"]), ("per_class_top5", ref["hit5"])):
            measured = result[key][c] * ref["count"][c] / 100 if ref["count"][c] else 0
            assert abs(measured - hits[c]) <= slack + 1e-6, (key, c)
    assert result["test_loss"] == pytest.approx(ref["loss"], abs=1e-4)
    assert 0 < sum(ref["hit1"]) < n  # the network is neither constant nor perfect: the comparison means something


@pytest.mark.parametrize("layout", ["ours", "model-dict", "state-dict"])
def test_every_layout_matches_a_naive_per_image_loop(files, reference, layout):
    path = files["paths"][layout]
    overrides = data_overrides(files["root"])
    if layout == "ours":  # the data set's identity comes from the checkpoint's stored config
        overrides = [f"dataset.root={files['root']}", "dataset.eval_batch_size=128", "trainer.device=cpu"]
    result = evaluate_checkpoint(path, overrides)
    assert result["layout"] == layout
    assert result["arch"] == "resnet8"
    assert result["arch_from"] == ("header" if layout == "ours" else "parameter shapes")
    assert result["dataset"] == "synthetic" and result["precision"] == "fp32"
    if layout == "ours":
        assert result["dataset_from"] == "the checkpoint's config"
    check_against(result, reference)
    assert result["published"] is None  # no published number for resnet8, and not CIFAR-100 anyway


@pytest.mark.parametrize("asked", [[], ["trainer.precision=bf16"], ["trainer.eval_precision=bf16"],
                                   ["trainer.precision=bf16", "trainer.eval_precision=fp32"]])
def test_the_forward_runs_in_the_precision_asked_for(files, reference, asked):
    """fp32 by default; trainer.precision=bf16 (README) or trainer.eval_precision=bf16 evaluate under bf16
    autocast, as the classifier's output dtype shows; an explicit eval_precision wins."""
    from torch.nn.modules.module import register_module_forward_hook

    wanted = "fp32" if not asked or asked[-1].endswith("fp32") else "bf16"
    seen: set[torch.dtype] = set()
    handle = register_module_forward_hook(
        lambda module, args, out: seen.add(out.dtype) if isinstance(module, torch.nn.Linear) else None)
    try:
        result = evaluate_checkpoint(files["paths"]["state-dict"], [*data_overrides(files["root"]), *asked])
    finally:
        handle.remove()
    assert result["precision"] == wanted
    assert seen == {torch.float32 if wanted == "fp32" else torch.bfloat16}
    # bf16 rounds the logits to 8 significant bits: the mean loss stays within a few hundredths of fp32's
    assert result["test_loss"] == pytest.approx(reference["loss"], abs=1e-4 if wanted == "fp32" else 0.05)


def test_json_output_parses_and_holds_the_numbers(files, reference):
    run = run_cli("scripts/evaluate.py", str(files["paths"]["state-dict"]), "model=resnet8",
                  *data_overrides(files["root"]), "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["arch_from"] == "model="
    check_against(result, reference)
    assert len(result["class_names"]) == CLASSES


def test_mistakes_are_one_line_with_status_2(files):
    missing = run_cli("scripts/evaluate.py", str(files["tmp"] / "nothing.pt"), "--json")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [f"error: checkpoint not found: {files['tmp'] / 'nothing.pt'}"]
    wrong = run_cli("scripts/evaluate.py", str(files["paths"]["ours"]), "model=resnet20", "trainer.device=cpu")
    assert wrong.returncode == 2
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in wrong.stderr
    # resnet20 has blocks resnet8 lacks: the message names missing keys and the architecture the weights fit
    assert "does not fit resnet20" in lines[0] and "missing keys: layer1.1." in lines[0]
    assert "pass model=resnet8" in lines[0]


@pytest.mark.parametrize("override", ["optim.lr=0.3", "trainer.epochs=5", "seed=3", "logger=wandb",
                                      "hydra.run.dir=/tmp/elsewhere", "distill=kd"])
def test_a_key_evaluation_does_not_read_is_one_line(files, override):
    """Training's keys exist in the composed config, so they were accepted and ignored; only the data set, the
    network, the device and the precision are read."""
    done = run_cli("scripts/evaluate.py", str(files["paths"]["ours"]), override)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line == (
        f"error: config key '{override.split('=')[0]}' is not read by scripts/evaluate.py: it reads model=, model.*, "
        f"dataset=, dataset.*, trainer.device, trainer.precision, trainer.eval_precision; drop {override}")


def test_a_class_count_the_data_set_lacks_is_refused(files, tmp_path):
    small = tmp_path / "ten.pth"
    model = build_model("resnet8", num_classes=10)
    torch.save({"model": model.state_dict()}, small)
    assert load_checkpoint(small).num_classes == 10  # read from the classifier's shape
    with pytest.raises(UserError, match="10-class resnet8, but the synthetic data set has 100 classes"):
        evaluate_checkpoint(small, data_overrides(files["root"]))
    with pytest.raises(UserError, match="shapes \\(file vs model\\): fc.weight \\[10, 64\\] vs \\[100, 64\\]"):
        load_checkpoint_with_classes(small)


def load_checkpoint_with_classes(path: Path) -> None:
    """A header that claims 100 classes over 10-class weights: the shape mismatch is named."""
    obj = torch.load(path, weights_only=True)
    obj.update({"arch": "resnet8", "num_classes": 100})
    torch.save(obj, path)
    load_checkpoint(path)


def test_published_teacher_check_by_hand():
    # resnet56's published top-1 is 72.34 (RepDistiller); one point below is the limit
    assert PUBLISHED_TOLERANCE == 1.0
    ok = published_check("resnet56", "cifar100", 10000, 71.50)
    assert ok["published_top1"] == 72.34 and ok["difference"] == pytest.approx(-0.84) and ok["ok"]
    low = published_check("resnet56", "cifar100", 10000, 71.00)
    assert low["difference"] == pytest.approx(-1.34) and not low["ok"]
    assert published_check("resnet56", "synthetic", 10000, 71.0) is None  # other data: no comparison
    assert published_check("resnet56", "cifar100", 5000, 71.0) is None  # a partial test split
    assert published_check("resnet8", "cifar100", 10000, 71.0) is None  # no published number


# ---- what is given as the checkpoint ---------------------------------------------------------------
def test_a_directory_is_named_and_its_checkpoints_suggested(files, tmp_path):
    with pytest.raises(UserError) as err:
        evaluate_checkpoint(files["tmp"])  # a run directory: final.pt is the usual choice
    assert str(err.value) == (f"checkpoint {files['tmp']} is a directory, not a file; name a checkpoint in it: "
                              f"{files['tmp'] / 'final.pt'}")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for name in ("b.pth", "a.pt", "notes.txt"):
        (downloads / name).write_bytes(b"")
    with pytest.raises(UserError, match=rf"is a directory, not a file; name a checkpoint in it: "
                                        rf"{downloads / 'a.pt'}, {downloads / 'b.pth'}$"):
        evaluate_checkpoint(downloads)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"is a directory, not a file; it holds no .pt/.pth file"):
        evaluate_checkpoint(tmp_path / "empty")


def test_a_text_file_is_named_as_such(tmp_path, capsys):
    from scripts import teachers as teachers_cmd

    notes = tmp_path / "resnet8.pt"
    notes.write_text("model: resnet8\nepochs: 240\n")
    expected = (f"checkpoint {notes} is not a torch checkpoint (it is a text file, beginning 'model: resnet8'); "
                f"give the .pt/.pth file that torch.save wrote")
    with pytest.raises(UserError) as err:
        evaluate_checkpoint(notes, ["trainer.device=cpu"])
    assert str(err.value) == expected
    (tmp_path / "hello.pt").write_text("hello world\n")  # the unpickler once read 'h' as an opcode: KeyError
    with pytest.raises(SystemExit) as stop:
        teachers_cmd.main(["add", str(tmp_path / "hello.pt"), "model=resnet8"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: checkpoint {tmp_path / 'hello.pt'} is not a torch checkpoint (it is a text file, beginning "
        f"'hello world'); give the .pt/.pth file that torch.save wrote"]
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"is not a torch checkpoint \(the file is empty\)"):
        evaluate_checkpoint(tmp_path / "empty.pt")


def write_image_folder(root: Path) -> dict[str, int]:
    """Two classes of PNGs in two sizes (so only a recorded image_size makes them one size); val counts per class."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed(5))
    counts = {"cat": 3, "dog": 2}
    for c, (name, n_val) in enumerate(counts.items()):
        for split, n in (("train", 4), ("val", n_val)):
            for i in range(n):
                size = 20 if i % 2 else 24
                pixels = torch.randint(0, 128, (size, size, 3), generator=gen, dtype=torch.uint8)
                pixels[..., c] += 127
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return counts


def test_an_image_folder_checkpoint_is_evaluated_on_its_recorded_folder(tmp_path):
    """No dataset.root or image_size on the command line: both come from the checkpoint's config."""
    root = tmp_path / "my l'images"  # a space and a quote: the recorded root reaches the config intact
    counts = write_image_folder(root)
    model = build_model("resnet8", num_classes=2)
    path = tmp_path / "final.pt"
    torch.save({"model": model.state_dict(), "arch": "resnet8", "num_classes": 2, "epoch": 1, "accuracy": 50.0,
                "config": {"dataset": {"name": "imagefolder", "root": str(root), "image_size": 16, "mean": None,
                                       "std": None, "num_classes": None, "batch_size": 8}}}, path)
    result = evaluate_checkpoint(path, ["trainer.device=cpu"])
    assert result["dataset"] == "imagefolder" and result["dataset_from"] == "the checkpoint's config"
    assert result["class_names"] == list(counts) and result["per_class_count"] == list(counts.values())
    assert result["num_images"] == sum(counts.values())
    quoted = "dataset.root='" + str(root).replace("'", "\\'") + "'"  # Hydra's quoting, typed by hand
    given = evaluate_checkpoint(path, ["dataset=imagefolder", quoted,
                                       "dataset.image_size=16", "trainer.device=cpu"])
    assert given["test_loss"] == result["test_loss"] and given["dataset_from"] == "command line"
    with pytest.raises(UserError, match="every image|one size|sizes"):  # without the recorded size: not one size
        evaluate_checkpoint(path, ["dataset=imagefolder", quoted, "trainer.device=cpu"])
    root.rename(tmp_path / "moved")
    with pytest.raises(UserError) as err:
        evaluate_checkpoint(path, ["trainer.device=cpu"])
    assert str(err.value) == (f"the checkpoint was trained on the imagefolder data set at {root}, which does not "
                              f"exist here: pass dataset.root=DIR (the folder holding train/ and val/)")
    moved = evaluate_checkpoint(path, [f"dataset.root={tmp_path / 'moved'}", "trainer.device=cpu"])
    assert moved["num_images"] == sum(counts.values())


def test_an_imagenet_checkpoint_carries_its_folder_and_evaluation_sizes(tmp_path):
    """Without dataset= on the command line an ImageNet checkpoint was refused ('dataset.root has no value'), and
    with only the root it was evaluated at eval_resize 256 instead of the size it was trained and tested at."""
    from distiller.jobs.evaluate import data_overrides

    (tmp_path / "inet").mkdir()
    stored = {"name": "imagenet", "root": str(tmp_path / "inet"), "image_size": 32, "eval_resize": 40,
              "num_classes": None, "mean": None, "std": None, "batch_size": 8}
    extra, origin = data_overrides({"config": {"dataset": stored}}, [])
    assert origin == "the checkpoint's config"
    assert set(extra) == {"dataset=imagenet", "dataset.image_size=32", "dataset.eval_resize=40",
                          f"dataset.root='{tmp_path / 'inet'}'"}, extra
    given, _ = data_overrides({"config": {"dataset": stored}}, ["dataset.root=/elsewhere"])
    assert "dataset.eval_resize=40" in given and not any(o.startswith("dataset.root=") for o in given)
    gone, _ = data_overrides({"config": {"dataset": {**stored, "root": str(tmp_path / "moved")}}}, [])
    assert not any(o.startswith("dataset.root=") for o in gone)  # not here: the command line must name it
