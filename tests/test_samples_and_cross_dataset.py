"""python -m nla_fast.data.samples (synthetic faces in RAF-DB's, FERPlus's and AffectNet's layouts,
read by the real loaders) and evaluating a checkpoint on another dataset, classes matched by
meaning (nla_fast.class_map)."""
import csv
import json

import numpy as np
import pytest
import torch

from nla_fast import train
from nla_fast.class_map import ClassMapError, map_classes, meaning
from nla_fast.data import load_dataset
from nla_fast.data.samples import main as samples_main
from nla_fast.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from nla_fast.data.synthetic import generate
from nla_fast.evaluate import main as evaluate_main
from nla_fast.evaluation import load_model, predict_logits

pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    assert samples_main(["--out", str(out), "--train", "24", "--test", "16", "--seed", "3"]) == 0
    return out


def test_each_layout_reads_back_with_the_faces_own_expressions(written):
    drawn = generate("train", num_samples=24, seed=3, resolution=100)
    expected = [meaning(SYNTHETIC_CLASSES[k]) for k in drawn["labels"].tolist()]
    rafdb = load_dataset("rafdb", written / "RAF-DB", "train", verbose=False)
    assert [meaning(rafdb.classes[k]) for k in rafdb.labels.tolist()] == expected
    faces = drawn["images"].numpy().astype(int)  # the JPEGs hold the same faces (another face differs ~50 levels)
    read = rafdb.images.numpy().astype(int)
    assert np.abs(read - faces).mean() < 8 < np.abs(read - np.roll(faces, 1, 0)).mean()

    ferplus = load_dataset("ferplus", written / "FERPlus", "train", label_mode="majority", verbose=False)
    by_row = dict(zip([f"fer{k:07d}.png" for k in range(24)], expected))
    assert len(ferplus) >= 20 and all(meaning(ferplus.classes[k]) == by_row[name]
                                      for k, name in zip(ferplus.labels.tolist(), ferplus.names))
    assert load_dataset("ferplus", written / "FERPlus", "valid", verbose=False).image_size == (48, 48)

    affectnet = load_dataset("affectnet", written / "AffectNet", "train", verbose=False)
    assert [meaning(affectnet.classes[k]) for k in affectnet.labels.tolist()] == expected
    with open(written / "AffectNet" / "training.csv", newline="") as handle:
        first = next(csv.DictReader(handle))
    face = generate("train", num_samples=24, seed=3, resolution=int(first["face_width"]))["images"][0]
    from nla_fast.data import resize_images

    crop, whole = affectnet.images[0].int(), resize_images(face[None], affectnet.image_size[0])[0].int()
    assert (crop - whole).abs().float().mean() < 6  # the loader cropped the face box out of the photo


def test_classes_are_matched_by_meaning():
    rafdb = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
    ferplus8 = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
    mapped = map_classes(ferplus8, rafdb)
    assert mapped.to_model == (6, 3, 0, 4, 5, 2, 1, None) and mapped.unpredictable == ["contempt"]
    assert "contempt    - (cannot be predicted)" in mapped.table().splitlines()
    reverse = map_classes(rafdb, ferplus8)
    assert reverse.model_only == ["contempt"] and reverse.table().endswith("contempt (no such class in the data)")
    assert map_classes(("Happy", "Sad"), ("sadness", "happiness")).to_model == (1, 0)
    with pytest.raises(ClassMapError, match="'Bored'"):
        map_classes(("Bored",), rafdb)


@pytest.mark.slow
def test_a_checkpoint_is_evaluated_on_another_dataset(written, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--dataset", "rafdb", "--data-root", str(written / "RAF-DB"), "--image-size", "32",
                       "--batch-size", "8", "--epochs", "1", "--backend", "reference", "--device", "cpu",
                       "--no-progress", "--plot-every", "0", "--out", str(run)]) == 0
    # three FERPlus test rows become contempt (eight votes), a class the RAF-DB checkpoint does not have
    new = written / "FERPlus" / "fer2013new.csv"
    rows = list(csv.reader(new.open(newline="")))
    tests = [k for k, row in enumerate(rows) if row[0] == "PrivateTest"][:3]
    for k in tests:
        rows[k][2:] = ["1", "0", "0", "0", "0", "0", "0", "8", "1", "0"]
    with new.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)

    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(run / "last.pt"), "--dataset", "ferplus", "--data-root",
                          str(written / "FERPlus"), "--num-classes", "8", "--json", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("matched to the checkpoint's by meaning") == 1 and "contempt" in captured.err
    result = json.loads(captured.out)
    assert result["class_map"]["happiness"] == "Happiness" and result["class_map"]["contempt"] is None
    assert result["unpredictable"]["contempt"]["samples"] == 3
    assert sum(result["unpredictable"]["contempt"]["predicted_as"].values()) == 3

    data = load_dataset("ferplus", written / "FERPlus", "test", num_classes=8, verbose=False)
    model = load_model(run / "last.pt", device="cpu")
    predicted = predict_logits(model, data.images, model.eval_transform).argmax(1)
    rafdb = list(model.classes)
    names = [data.classes[k] for k in data.labels.tolist()]
    kept = [(rafdb.index(name.capitalize()), int(p)) for name, p in zip(names, predicted.tolist()) if name != "contempt"]
    assert result["samples"] == len(kept) == len(data) - 3
    assert result["acc"] == pytest.approx(sum(t == p for t, p in kept) / len(kept))
    confusion = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in kept:
        confusion[t, p] += 1
    assert result["confusion"] == confusion.tolist()  # rows and columns in the checkpoint's classes

    assert evaluate_main(["--checkpoint", str(run / "last.pt"), "--dataset", "affectnet", "--data-root",
                          str(written / "AffectNet"), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.count("matched to the checkpoint's by meaning") == 1 and "Happy       Happiness" in text
