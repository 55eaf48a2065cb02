"""spg_dist.data: layout readers, spec parsing and its errors, decoding, and the synthetic generator."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from spg_dist.data import (
    DEFECT_KINDS, MVTEC_CATEGORIES, VISA_CATEGORIES, DatasetError, ImageDecodeError, list_records, load_image,
    load_mask, parse_dataset_spec, record_problems, synthesize,
)
from spg_dist.data.synth import MAX_AREA, MIN_AREA, apply_defect, load_source, sample_view


def _png(path: Path, value: int = 128, size: int = 16, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode != "RGB" else (value, value, value)).save(path)
    return path


def _summary(records) -> list[tuple]:
    return [(r.image_id, r.category, r.split, r.label, r.defect_type) for r in records]


# ---------------------------------------------------------------- MVTec AD

@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "mv"
    for rel in ["bottle/train/good/000.png", "bottle/train/good/001.png", "bottle/test/good/000.png",
                "bottle/test/broken/000.png", "bottle/test/broken/001.png", "cable/train/good/000.png"]:
        _png(root / rel)
    _png(root / "bottle/ground_truth/broken/000_mask.png", 255, mode="L")
    (root / "license.txt").write_text("not a category")
    (root / "notes").mkdir()  # a folder without train/ or test/ is not a category
    return root


def test_mvtec_records(mvtec_root: Path) -> None:
    recs = list_records(f"mvtec:{mvtec_root}")
    assert _summary(recs) == [
        ("mv/bottle/test/broken/000", "bottle", "test", 1, "broken"),
        ("mv/bottle/test/broken/001", "bottle", "test", 1, "broken"),
        ("mv/bottle/test/good/000", "bottle", "test", 0, "good"),
        ("mv/bottle/train/good/000", "bottle", "train", 0, "good"),
        ("mv/bottle/train/good/001", "bottle", "train", 0, "good"),
        ("mv/cable/train/good/000", "cable", "train", 0, "good"),
    ]
    assert recs[0].mask_uri == str(mvtec_root / "bottle/ground_truth/broken/000_mask.png")
    assert recs[0].image_uri == str(mvtec_root / "bottle/test/broken/000.png")
    assert all(r.mask_uri == "" for r in recs[1:]) and all(r.dataset == "mv" for r in recs)
    assert record_problems(recs[0]) is None and record_problems(recs[2]) is None
    # the anomalous image without a mask is listed, and its problem names the expected mask path
    why = record_problems(recs[1])
    assert why == f"anomalous image has no mask: expected {mvtec_root / 'bottle/ground_truth/broken/001_mask.png'}"


def test_mvtec_name_and_filters(mvtec_root: Path) -> None:
    recs = list_records(f"mvtec:{mvtec_root}@prod", categories=["cable"])
    assert [r.image_id for r in recs] == ["prod/cable/train/good/000"]
    assert parse_dataset_spec(f"mvtec:{mvtec_root}@prod", name="cli").name == "cli"
    assert len(list_records(f"mvtec:{mvtec_root}", categories="bottle,cable", splits="test")) == 3
    assert len(list_records(f"mvtec:{mvtec_root}", splits=["train"])) == 3
    with pytest.raises(DatasetError, match=r"unknown category wood .*available: bottle, cable"):
        list_records(f"mvtec:{mvtec_root}", categories=["wood"])
    with pytest.raises(DatasetError, match="unknown split"):
        list_records(f"mvtec:{mvtec_root}", splits=["val"])
    with pytest.raises(DatasetError, match="present splits: train"):
        list_records(f"mvtec:{mvtec_root}", categories=["cable"], splits=["test"])


# ---------------------------------------------------------------- VisA

def _visa(tmp_path: Path, csv_text: str) -> Path:
    root = tmp_path / "VisA"
    for rel in ["candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
                "candle/Data/Images/Anomaly/000.JPG", "pcb1/Data/Images/Anomaly/000.JPG"]:
        _png(root / rel)  # PNG bytes under a .JPG name: decoders sniff content, readers only list
    _png(root / "candle/Data/Masks/Anomaly/000.png", 3, mode="L")  # VisA masks hold small label values
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text(csv_text)
    return root


VISA_CSV = ("object,split,label,image,mask\n"
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
            "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
            "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,\n")


def test_visa_records(tmp_path: Path) -> None:
    root = _visa(tmp_path, "\ufeff" + VISA_CSV)  # a BOM, as spreadsheet exports write
    recs = list_records(f"visa:{root}")
    assert _summary(recs) == [
        ("VisA/candle/Data/Images/Anomaly/000", "candle", "test", 1, "anomaly"),
        ("VisA/candle/Data/Images/Normal/0000", "candle", "train", 0, "good"),
        ("VisA/candle/Data/Images/Normal/0001", "candle", "test", 0, "good"),
        ("VisA/pcb1/Data/Images/Anomaly/000", "pcb1", "test", 1, "anomaly"),
    ]
    assert recs[0].mask_uri == str(root / "candle/Data/Masks/Anomaly/000.png")
    assert recs[1].mask_uri == "" and recs[0].image_uri == str(root / "candle/Data/Images/Anomaly/000.JPG")
    assert load_mask(recs[0].mask_uri, 8).min() == 1  # label value 3 counts as defect
    assert "has no mask" in record_problems(recs[3])


@pytest.mark.parametrize("csv_text, pattern", [
    ("object,split,image\ncandle,train,x.png\n", "missing column.*label, mask"),
    (VISA_CSV.replace("test,anomaly", "test,broken", 1), "1cls.csv:4: label 'broken'"),
    (VISA_CSV.replace("train,normal", "val,normal", 1), "1cls.csv:2: split 'val'"),
])
def test_visa_bad_csv(tmp_path: Path, csv_text: str, pattern: str) -> None:
    root = _visa(tmp_path, csv_text)
    with pytest.raises(DatasetError, match=pattern) as e:
        list_records(f"visa:{root}")
    assert str(root / "split_csv" / "1cls.csv") in str(e.value)


# ---------------------------------------------------------------- plain folder

def test_folder_rules(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    for rel in ["top.png", "widget/train/good/a.png", "widget/test/good/b.bmp", "widget/test/scratch/c.png",
                "widget/test/dent/d.tif", "widget/test/misc/e.jpg", "gadget/x.png", "gadget/q/f.png",
                "widget/test/p/f.png"]:
        _png(root / rel)
    for rel in ["widget/test/scratch/c_mask.png", "widget/ground_truth/dent/d_mask.png", "masks/x_mask.png",
                "masks/y.png", "gadget/masks/q/f_mask.png", "widget/ground_truth/p/f_mask.png",
                "widget/train/good/a_mask.png"]:
        _png(root / rel, 255, mode="L")
    (root / ".hidden").mkdir()
    _png(root / ".hidden/z.png")
    (root / "widget/readme.txt").write_text("x")
    (root / "widget/loop").symlink_to(root / "widget", target_is_directory=True)  # must not recurse forever
    recs = {r.image_id: r for r in list_records(f"folder:{root}")}
    assert _summary(recs.values()) == [
        ("shop/gadget/q/f", "gadget", "test", 1, "q"),
        ("shop/gadget/x", "gadget", "test", 1, "gadget"),
        ("shop/top", "shop", "test", -1, ""),
        ("shop/widget/test/dent/d", "widget", "test", 1, "dent"),
        ("shop/widget/test/good/b", "widget", "test", 0, "good"),
        ("shop/widget/test/misc/e", "widget", "test", -1, ""),
        ("shop/widget/test/p/f", "widget", "test", 1, "p"),
        ("shop/widget/test/scratch/c", "widget", "test", 1, "scratch"),
        ("shop/widget/train/good/a", "widget", "train", 0, "good"),
    ]
    assert recs["shop/widget/test/scratch/c"].mask_uri == str(root / "widget/test/scratch/c_mask.png")
    assert recs["shop/widget/test/dent/d"].mask_uri == str(root / "widget/ground_truth/dent/d_mask.png")
    assert recs["shop/gadget/x"].mask_uri == str(root / "masks/x_mask.png")
    # same stem, two mask folders: each image takes the mask whose folders resemble its own
    assert recs["shop/gadget/q/f"].mask_uri == str(root / "gadget/masks/q/f_mask.png")
    assert recs["shop/widget/test/p/f"].mask_uri == str(root / "widget/ground_truth/p/f_mask.png")
    assert recs["shop/widget/train/good/a"].mask_uri == ""  # "good" wins over a stray mask
    assert recs["shop/widget/test/dent/d"].image_uri == str(root / "widget/test/dent/d.tif")


def test_folder_ambiguous_masks_and_duplicate_ids(tmp_path: Path) -> None:
    root = tmp_path / "amb"
    _png(root / "a/img.png")
    _png(root / "masks/one/img_mask.png", 255, mode="L")
    _png(root / "masks/two/img_mask.png", 255, mode="L")
    (rec,) = list_records(f"folder:{root}")
    assert rec.label == -1 and "several masks" in record_problems(rec)
    _png(root / "a/img.jpg")
    with pytest.raises(DatasetError, match="share the id 'amb/a/img'"):
        list_records(f"folder:{root}")


# ---------------------------------------------------------------- spec errors

def test_spec_errors(tmp_path: Path, mvtec_root: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = _png(tmp_path / "file.png")
    cases = [
        (f"mvtec:{tmp_path / 'nope'}", str(tmp_path / "nope"), "does not exist"),
        (f"folder:{a_file}", str(a_file), "not a directory"),
        (f"visa:{empty}", str(empty), "no split_csv/1cls.csv"),
        (f"mvtec:{empty}", str(empty), "no images found"),
        (f"folder:{empty}", str(empty), "no images found"),
        (f"coco:{empty}", f"coco:{empty}", "unknown dataset layout 'coco'"),
        (f"mvtec:{mvtec_root / 'bottle'}", str(mvtec_root / "bottle"), "looks like one MVTec category"),
        (str(empty), str(empty), "no layout prefix"),
    ]
    for spec, path, what in cases:
        with pytest.raises(DatasetError) as e:
            list_records(spec)
        msg = str(e.value)
        assert path in msg and what in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- decoding

def test_load_image_and_mask(tmp_path: Path) -> None:
    g = _png(tmp_path / "g.png", 77, size=20, mode="L")
    im = load_image(g, None)
    assert im.shape == (20, 20, 3) and im.dtype == np.uint8 and (im == 77).all()
    assert load_image(g, 8).shape == (8, 8, 3)
    m = np.zeros((20, 20), np.uint8)
    m[5:10, 5:15] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", None).tolist() == (m > 0).astype(np.uint8).tolist()
    small = load_mask(tmp_path / "m.png", 10)
    assert small.dtype == np.uint8 and small.tolist() == (m[1::2, 1::2] > 0).astype(np.uint8).tolist()  # nearest
    assert load_mask("", 12).shape == (12, 12) and load_mask("", 12).max() == 0
    with pytest.raises(ValueError):
        load_mask("", None)


def test_truncated_and_corrupt_files_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "t.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # even if another library flipped it
    with pytest.raises(ImageDecodeError, match=str(path)):
        load_image(path, 32)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageDecodeError, match=str(path)):
        load_mask(path, 32)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="junk.png"):
        load_image(tmp_path / "junk.png", None)
    with pytest.raises(ImageDecodeError, match="not found.*missing.png"):
        load_image(tmp_path / "missing.png", None)


# ---------------------------------------------------------------- synthetic generator

@pytest.fixture(scope="module")
def synth_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    return {lay: synthesize(base / lay, layout=lay, seed=0, n_train=2, n_test_good=1, n_test_bad=3, image_size=64)
            for lay in ("mvtec", "visa")}


@pytest.mark.parametrize("layout", ["mvtec", "visa"])
def test_synth_layouts_read_back(synth_roots: dict[str, Path], layout: str) -> None:
    recs = list_records(f"{layout}:{synth_roots[layout]}")
    expected = MVTEC_CATEGORIES if layout == "mvtec" else VISA_CATEGORIES
    assert len(expected) >= 6 and {r.category for r in recs} == set(expected)
    assert len(recs) == 6 * len(expected)
    assert sum(r.split == "train" for r in recs) == 2 * len(expected)
    assert sum(r.label == 1 for r in recs) == 3 * len(expected)
    for r in recs:
        assert record_problems(r) is None
        assert load_image(r.image_uri, None).shape == (64, 64, 3)
        mask = load_mask(r.mask_uri, 64)
        assert (mask.sum() > 0) == (r.label == 1)
        if r.label == 1:
            assert MIN_AREA <= mask.mean() <= MAX_AREA
            if layout == "mvtec":
                assert r.defect_type in DEFECT_KINDS


def test_synth_categories_disjoint() -> None:
    assert not set(MVTEC_CATEGORIES) & set(VISA_CATEGORIES)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_deterministic(tmp_path: Path) -> None:
    kw = dict(n_train=1, n_test_good=1, n_test_bad=2, image_size=48, categories=["coins", "flower"])
    a = _digest(synthesize(tmp_path / "a", layout="visa", seed=3, **kw))
    b = _digest(synthesize(tmp_path / "b", layout="visa", seed=3, **kw))
    c = _digest(synthesize(tmp_path / "c", layout="visa", seed=4, **kw))
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".png"))
    synthesize(tmp_path / "a", layout="visa", seed=3, **kw)  # re-writing our own output is allowed
    assert _digest(tmp_path / "a") == a
    _png(tmp_path / "user/keep.png")
    with pytest.raises(DatasetError, match="not written by synth"):
        synthesize(tmp_path / "user", layout="mvtec", **kw)
    assert (tmp_path / "user/keep.png").exists()


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_mask_is_exactly_the_changed_region(kind: str) -> None:
    for i in range(3):
        rng = np.random.default_rng(i)
        img = sample_view(load_source("gravel"), rng, 96)
        out, mask, got = apply_defect(img, rng, kind=kind)
        assert got == kind
        assert (out[~mask] == img[~mask]).all()  # nothing outside the mask moved
        assert (np.abs(out.astype(int) - img).max(2)[mask] > 0).mean() >= 0.9  # the mask is what moved
        assert MIN_AREA <= mask.mean() <= MAX_AREA
