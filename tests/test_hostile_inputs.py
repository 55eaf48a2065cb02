"""Hostile dataset inputs: decompression bombs and over-limit images, masks that do not fit their image, and
dataset files that point outside their root. Each becomes one `errors` row (one line, the right stage) while every
good image of the same batch decodes; refused outside paths are never opened nor looked up.

Mostly pure functions (`decode_batch`, the readers); one end-to-end run on the session's Ray cluster."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spg_dist.data import ImageDecodeError, list_records, load_image, load_mask, record_problems
from spg_dist.data.imageio import MAX_PIXELS, ImageLimitError, image_size
from spg_dist.data.records import path_in_root
from spg_dist.ray.extract_ops import RECORD_COLUMNS, decode_batch

PILLOW_LIMIT = 2 * Image.MAX_IMAGE_PIXELS  # Pillow raises DecompressionBombError over this


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG of ~100 bytes whose header claims ``width`` x ``height`` (1-bit grey): a decompression bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _img(path: Path, size: tuple[int, int] = (16, 16), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (16, 16), on: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    if on:
        m[2:6, 3:9] = 255
    Image.fromarray(m).save(path)
    return path


def _row(image_uri: str | Path, mask_uri: str | Path = "", label: int = 0, image_id: str | None = None) -> dict:
    return dict(image_id=image_id or f"ds/{Path(str(image_uri)).stem}", dataset="ds", category="c", split="test",
                label=label, defect_type="good" if label == 0 else "x", image_uri=str(image_uri),
                mask_uri=str(mask_uri))


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """The numpy batch Ray Data hands to `decode_batch`."""
    rows = [{**r, "source_image_id": "", "corruption": 0} for r in rows]
    cols = {k: np.array([r[k] for r in rows], dtype=object) for k in (*RECORD_COLUMNS, "source_image_id")}
    cols["label"] = np.array([r["label"] for r in rows], np.int64)
    cols["corruption"] = np.array([r["corruption"] for r in rows], np.int64)
    return cols


def _records_batch(records) -> dict[str, np.ndarray]:
    return _batch([{k: getattr(r, k) for k in RECORD_COLUMNS} for r in records])


def _one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "\r" not in text


# ---------------------------------------------------------------- pixel limit and decompression bombs

def test_bomb_and_over_limit_images_become_decode_rows(tmp_path: Path) -> None:
    good_a, good_b = _img(tmp_path / "a.png"), _img(tmp_path / "b.png", value=7)
    bomb = _png_header(tmp_path / "bomb.png", 30000, 30000)
    mid = _png_header(tmp_path / "mid.png", 10000, 10000)  # 100 MP: over our 64 MP, Pillow only warns
    big = _img(tmp_path / "big.png", (20, 20))  # 400 pixels: just over the test limit below
    assert bomb.stat().st_size < 120
    rows = [_row(good_a), _row(bomb), _row(big), _row(good_b), _row(mid)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        out = decode_batch(_batch(rows), 8, max_pixels=399)
        default = decode_batch(_batch(rows), 8)
    assert list(out["error_stage"]) == ["", "decode", "decode", "", "decode"]
    assert out["error"][1] == (f"image {bomb} is over the pixel limit of 399 pixels, not decoded (Pillow: "
                               f"DecompressionBombError: Image size (900000000 pixels) exceeds limit of "
                               f"{PILLOW_LIMIT} pixels, could be decompression bomb DOS attack.)")
    assert out["error"][2] == (f"image {big} is 20x20 = 400 pixels, over the limit of 399 pixels, not decoded "
                               f"(raise max_pixels or SPG_MAX_IMAGE_PIXELS if it is genuine)")
    assert out["error"][4].startswith(f"image {mid} is 10000x10000 = 100,000,000 pixels, over the limit of 399")
    assert all(_one_line(e) for e in out["error"][[1, 2, 4]])
    # the good images of the same batch decode exactly as load_image does, with their own size recorded
    np.testing.assert_array_equal(out["pixels"][0], load_image(good_a, 8))
    np.testing.assert_array_equal(out["pixels"][3], load_image(good_b, 8))
    assert (out["width"][[0, 3]] == 16).all() and (out["height"][[0, 3]] == 16).all()
    assert not out["pixels"][[1, 2, 4]].any() and not out["width"][[1, 2, 4]].any()
    # default limit (64 MP): the 20x20 image is fine; both bomb headers are refused, naming the limit in force
    assert list(default["error_stage"]) == ["", "decode", "", "", "decode"]
    assert f"over the pixel limit of {MAX_PIXELS:,} pixels" in default["error"][1]
    assert default["error"][4].startswith(f"image {mid} is 10000x10000 = 100,000,000 pixels, over the limit of "
                                          f"{MAX_PIXELS:,} pixels, not decoded")


def test_pillow_bomb_check_never_escapes_a_loader(tmp_path: Path) -> None:
    bomb = _png_header(tmp_path / "bomb.png", 30000, 30000)
    before = Image.MAX_IMAGE_PIXELS
    for call in (lambda: image_size(bomb), lambda: load_mask(bomb, 8), lambda: load_image(bomb, 8),
                 lambda: load_image(bomb, 8, max_pixels=10**12)):  # over Pillow's own limit: reported, not raised
        with pytest.raises(ImageDecodeError) as e:
            call()
        assert str(bomb) in str(e.value) and "pixel limit" in str(e.value) and _one_line(str(e.value))
    with pytest.raises(ImageDecodeError, match=f"limit of {PILLOW_LIMIT:,} pixels"):
        load_image(bomb, 8, max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == before  # nobody switched Pillow's check off
    mid = _png_header(tmp_path / "mid.png", 10000, 10000)
    assert image_size(mid) == (10000, 10000)  # reading a header is harmless: no limit unless asked
    with pytest.raises(ImageDecodeError, match="over the limit of 64,000,000"):
        image_size(mid, max_pixels=MAX_PIXELS)


def test_pixel_limit_from_the_environment_and_bad_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = _img(tmp_path / "big.png", (20, 20))
    monkeypatch.setenv("SPG_MAX_IMAGE_PIXELS", "399")
    with pytest.raises(ImageDecodeError, match="400 pixels, over the limit of 399"):
        load_image(big, 8)
    assert load_image(big, 8, max_pixels=400).shape == (8, 8, 3)  # an explicit argument wins
    monkeypatch.setenv("SPG_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ImageLimitError, match="SPG_MAX_IMAGE_PIXELS='lots' is not a whole number"):
        decode_batch(_batch([_row(big)]), 8)  # a setting, not a bad file: fails once, in one line
    monkeypatch.delenv("SPG_MAX_IMAGE_PIXELS")
    for bad in (0, -5, 1.5):
        with pytest.raises(ImageLimitError, match="positive whole number"):
            load_image(big, 8, max_pixels=bad)


def test_any_exception_for_one_file_is_one_decode_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    good = _img(tmp_path / "good.png")
    weird_open = _img(tmp_path / "weird_open.png")
    weird_load = _img(tmp_path / "weird_load.png")
    eps = tmp_path / "eps.png"  # EPS content under a .png name: would run Ghostscript if it were decoded
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it for reading would block forever
    folder = tmp_path / "folder.png"
    folder.mkdir()
    newline = tmp_path / "new\nline.png"  # a file name that would split the errors line

    real_open, real_load = Image.open, ImageFile.ImageFile.load

    def open_(fp, *a, **k):
        if str(fp).endswith("weird_open.png"):
            raise RuntimeError("plugin bug\nsecond line")
        return real_open(fp, *a, **k)

    def load(self):
        if str(getattr(self, "filename", "")).endswith("weird_load.png"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real_load(self)

    monkeypatch.setattr(Image, "open", open_)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    rows = [_row(weird_open), _row(good), _row(weird_load), _row(eps), _row(fifo), _row(folder), _row(newline)]
    out = decode_batch(_batch(rows), 8)
    assert list(out["error_stage"]) == ["decode", "", "decode", "decode", "decode", "decode", "decode"]
    err = list(out["error"])
    assert err[0] == f"cannot decode image {weird_open}: RuntimeError: plugin bug second line"
    assert err[2] == f"cannot decode image {weird_load}: error: unpack requires a buffer of 4 bytes"
    assert err[3].startswith(f"cannot decode image {eps}: UnidentifiedImageError")
    assert err[4] == f"image is not a regular file: {fifo}" and err[5] == f"image is not a regular file: {folder}"
    assert err[6] == f"image file not found: {str(newline)!r}"
    assert all(_one_line(e) for i, e in enumerate(err) if i != 1)
    np.testing.assert_array_equal(out["pixels"][1], load_image(good, 8))


# ---------------------------------------------------------------- masks

def test_masks_that_do_not_fit_their_image_become_mask_rows(tmp_path: Path) -> None:
    img = _img(tmp_path / "img.png", (16, 12))
    ok = _mask(tmp_path / "ok_mask.png", (16, 12))
    small = _mask(tmp_path / "small_mask.png", (8, 6))
    empty = _mask(tmp_path / "empty_mask.png", (16, 12), on=False)
    bomb = _png_header(tmp_path / "bomb_mask.png", 30000, 30000)
    rows = [_row(img, ok, 1, "ds/ok"), _row(img, small, 1, "ds/small"), _row(img, empty, 1, "ds/empty"),
            _row(img, small, 0, "ds/normal_small"), _row(img, empty, 0, "ds/normal_empty"),
            _row(img, bomb, 1, "ds/bomb"), _row(img, "", 1, "ds/none")]
    out = decode_batch(_batch(rows), 8)
    assert list(out["error_stage"]) == [""] * 7  # every image decodes: its tokens are kept
    np.testing.assert_array_equal(out["pixels"][1], load_image(img, 8))
    me = list(out["mask_error"])
    assert me[0] == "" and me[4] == ""  # an empty mask is fine on a normal image
    size_msg = f"mask {small} is 8x6 but its image is 16x12: a mask must have its image's size, it is not stretched"
    assert me[1] == size_msg and me[3] == size_msg
    assert me[2] == f"anomalous image has an empty mask: {empty} is all zero (fix the mask or label the image normal)"
    assert me[5].startswith(f"mask {bomb} is over the pixel limit of {MAX_PIXELS:,} pixels, not decoded")
    assert me[6] == f"{img}: anomalous image has no mask; add one or it cannot be used for pixel metrics"
    # a bad mask is dropped like a missing one: no later stage reads a mask known to be wrong
    assert list(out["mask_uri"]) == [str(ok), "", "", "", str(empty), "", ""]


def test_normal_image_masks_are_checked_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    img = _img(tmp_path / "img.png")
    mask = _mask(tmp_path / "m.png")
    loaded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        loaded.append(Path(self.filename).name)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    out = decode_batch(_batch([_row(img, mask, 0)]), 8)
    assert out["mask_error"][0] == "" and set(loaded) == {"img.png"}  # the mask's pixels were never decoded
    out = decode_batch(_batch([_row(img, mask, 1)]), 8)
    assert out["mask_error"][0] == "" and set(loaded) == {"img.png", "m.png"}  # emptiness needs the pixels


# ---------------------------------------------------------------- paths outside the dataset root

@pytest.mark.parametrize("raw, expected", [
    ("a/b.png", "a/b.png"), ("./a//b.png", "a/b.png"), ("a/../b.png", "b.png"), ("a\\b.png", "a/b.png"),
    ("../x.png", None), ("a/../../x.png", None), ("..\\..\\x.png", None), ("..", None), ("/etc/x.png", None),
    ("//etc/x.png", None), ("ROOT/a.png", "a.png"), ("ROOT/../x.png", None), ("ROOTx/a.png", None),
    ("REAL/a.png", "a.png"), ("C:/x.png", "C:/x.png"), ("", "."),
])
def test_path_in_root(tmp_path: Path, raw: str, expected: str | None) -> None:
    real = tmp_path / "real"
    real.mkdir()
    root = tmp_path / "root"
    root.symlink_to(real, target_is_directory=True)
    raw = raw.replace("ROOT", str(root)).replace("REAL", str(real))
    got = path_in_root(root, raw)
    assert (None if got is None else got.as_posix()) == expected


def _visa_root(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "VisA"
    outside = tmp_path / "outside"
    _img(outside / "secret.png")
    _mask(outside / "secret_mask.png")
    _img(root / "c/Data/Images/Normal/0.png")
    _img(root / "c/Data/Images/Anomaly/0.png")
    _img(root / "c/Data/Images/Anomaly/1.png")
    _mask(root / "c/Data/Masks/Anomaly/0.png")
    paths = {"dotdot": "../../etc/x.png", "existing": str(outside / "secret.png"),
             "missing": str(outside / "missing.png"), "climb": "c/../../outside/secret.png",
             "windows": "..\\outside\\secret.png"}
    rows = ["object,split,label,image,mask",
            "c,train,normal,c/Data/Images/Normal/0.png,",
            f"c,test,anomaly,{root}/c/Data/Images/Anomaly/0.png,c/./Data/Masks/Anomaly/0.png",  # absolute, inside
            "c,test,anomaly,c/Data/Images/Anomaly/1.png,../outside/secret_mask.png",  # mask outside the root
            *[f"c,test,normal,{p}," for p in paths.values()]]
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return root, paths


def test_visa_paths_outside_the_root_are_listed_refused_and_never_opened(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, paths = _visa_root(tmp_path)
    touched: list[str] = []
    real_open, real_stat = Image.open, os.stat
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: touched.append(str(fp)) or real_open(fp, *a, **k))
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: touched.append(os.fspath(p)) or real_stat(p, *a, **k))

    recs = list_records(f"visa:{root}")
    by_uri = {r.image_uri: r for r in recs}
    refused = [r for r in recs if r.image_uri.startswith("outside-root:")]
    assert len(recs) == 8 and len(refused) == 5
    assert {r.image_uri for r in refused} == {f"outside-root:{p.replace(chr(92), '/')}" for p in paths.values()}
    assert all(r.image_id.startswith("VisA/outside-root/") and r.extra["refused"] for r in refused)
    inside = by_uri[str(root / "c/Data/Images/Anomaly/0.png")]  # an absolute path inside the root is fine
    assert inside.image_id == "VisA/c/Data/Images/Anomaly/0"
    assert inside.mask_uri == str(root / "c/Data/Masks/Anomaly/0.png")
    out_mask = by_uri[str(root / "c/Data/Images/Anomaly/1.png")]
    assert out_mask.mask_uri == "outside-root:../outside/secret_mask.png"

    problems = {r.image_uri: record_problems(r) for r in recs}
    out = decode_batch(_records_batch(recs), 8)
    stages = dict(zip(out["image_uri"], out["error_stage"]))
    errors = dict(zip(out["image_uri"], out["error"]))
    for r in refused:
        raw = r.image_uri[len("outside-root:"):]
        assert stages[r.image_uri] == "path"
        assert errors[r.image_uri] == problems[r.image_uri] == f"image path outside the dataset root, not read: {raw}"
    # the same message for an outside file that exists and one that does not: nothing leaks
    ex, mi = (f"outside-root:{paths[k]}" for k in ("existing", "missing"))
    assert errors[ex].replace(paths["existing"], "P") == errors[mi].replace(paths["missing"], "P")
    # the good images decode; the one with a mask outside the root keeps its tokens and reports the mask
    assert [stages[str(root / f"c/Data/Images/{p}.png")] for p in ("Normal/0", "Anomaly/0", "Anomaly/1")] == [""] * 3
    i = list(out["image_uri"]).index(out_mask.image_uri)
    assert out["mask_error"][i] == problems[out_mask.image_uri] == \
        "mask path outside the dataset root, not read: ../outside/secret_mask.png"
    assert out["mask_uri"][i] == ""
    # nothing outside the root was opened or even stat'ed (listing, problems and decoding alike)
    far = str(tmp_path / "outside")
    assert touched and not [p for p in touched if os.path.normpath(p).startswith(far) or "etc/x.png" in p]


def test_visa_hostile_csv_text_stays_one_line(tmp_path: Path) -> None:
    from spg_dist.data import DatasetError

    root = tmp_path / "V"
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text('object,split,"lab\nel",image,mask\n')
    with pytest.raises(DatasetError) as e:
        list_records(f"visa:{root}")
    assert _one_line(str(e.value)) and "missing column(s) label" in str(e.value)
    (root / "split_csv/1cls.csv").write_text("object,split,label,image,mask\nc,test,normal,.,\n")
    with pytest.raises(DatasetError, match="1cls.csv:2: image path '.' names the dataset root"):
        list_records(f"visa:{root}")
    dup = "object,split,label,image,mask\n" + "c,test,normal,../x.png,\n" * 2
    (root / "split_csv/1cls.csv").write_text(dup)
    with pytest.raises(DatasetError, match="share the id 'V/outside-root/"):
        list_records(f"visa:{root}")


def test_mvtec_glob_characters_in_names_never_borrow_a_mask(tmp_path: Path) -> None:
    root = tmp_path / "mv"
    for name in ("000", "*", "[0]00"):
        _img(root / f"bottle/test/broken/{name}.png")
    _img(root / "bottle/train/good/000.png")
    _mask(root / "bottle/ground_truth/broken/000_mask.png")
    recs = {r.image_id: r for r in list_records(f"mvtec:{root}")}
    assert recs["mv/bottle/test/broken/000"].mask_uri == str(root / "bottle/ground_truth/broken/000_mask.png")
    for name in ("*", "[0]00"):
        r = recs[f"mv/bottle/test/broken/{name}"]
        assert r.mask_uri == "" and record_problems(r) == (
            f"anomalous image has no mask: expected {root / 'bottle/ground_truth/broken'}/{name}_mask.png")


# ---------------------------------------------------------------- end to end

@pytest.mark.ray
def test_extract_visa_with_hostile_rows(ray_cluster, tmp_path: Path) -> None:
    from spg_dist.data.synth import synthesize
    from spg_dist.ray.extract import extract
    from spg_dist.store import Store

    root = synthesize(tmp_path / "visa", layout="visa", image_size=64, n_train=2, n_test_good=1, n_test_bad=2,
                      categories=["chelsea"])
    n_good = len(list_records(f"visa:{root}"))
    h = root / "chelsea/Data/Hostile"
    _png_header(h / "bomb.png", 30000, 30000)
    _png_header(h / "big.png", 10000, 10000)  # over the 64 MP default; Pillow alone would only warn
    _img(h / "resized.png", (64, 64)), _mask(h / "resized_mask.png", (32, 32))
    _img(h / "empty.png", (64, 64)), _mask(h / "empty_mask.png", (64, 64), on=False)
    _img(h / "far_mask.png", (64, 64)), _mask(tmp_path / "outside/secret_mask.png", (64, 64))
    _img(tmp_path / "outside/secret.png", (64, 64))
    outside = {"../../etc/x.png": None, str(tmp_path / "outside/secret.png"): None,
               str(tmp_path / "outside/missing.png"): None}
    rows = ["chelsea,test,normal,chelsea/Data/Hostile/bomb.png,", "chelsea,test,normal,chelsea/Data/Hostile/big.png,",
            "chelsea,test,anomaly,chelsea/Data/Hostile/resized.png,chelsea/Data/Hostile/resized_mask.png",
            "chelsea,test,anomaly,chelsea/Data/Hostile/empty.png,chelsea/Data/Hostile/empty_mask.png",
            "chelsea,test,anomaly,chelsea/Data/Hostile/far_mask.png,../outside/secret_mask.png",
            *[f"chelsea,test,normal,{p}," for p in outside]]
    with open(root / "split_csv/1cls.csv", "a") as fh:
        fh.write("\n".join(rows) + "\n")
    recs = list_records(f"visa:{root}")
    for r in recs:
        if r.image_uri.startswith("outside-root:"):
            outside[r.image_uri[len("outside-root:"):]] = r.image_id
    assert len(recs) == n_good + 8 and None not in outside.values()

    store = Store(tmp_path / "store")
    res = extract(store, f"visa:{root}", "tiny-dinov3", image_size=64, batch_size=8, progress=False)
    written = n_good + 3  # the three with a bad mask keep their tokens
    assert res.rows_written == written * len(res.layers) == store.count("patch_tokens")
    assert store.count("images") == written
    hid = "visa/chelsea/Data/Hostile"
    expected = {("decode", f"{hid}/bomb"), ("decode", f"{hid}/big"), ("mask", f"{hid}/resized"),
                ("mask", f"{hid}/empty"), ("mask", f"{hid}/far_mask"), *[("path", i) for i in outside.values()]}
    errs = store.read("errors").to_pylist()
    assert len(errs) == len(expected) == 8 and {(e["stage"], e["image_id"]) for e in errs} == expected
    reason = {e["image_id"]: e["reason"] for e in errs}
    assert "over the pixel limit" in reason[f"{hid}/bomb"] and "over the limit" in reason[f"{hid}/big"]
    assert "is 32x32 but its image is 64x64" in reason[f"{hid}/resized"]
    assert reason[f"{hid}/empty"].startswith("anomalous image has an empty mask")
    assert reason[f"{hid}/far_mask"] == "mask path outside the dataset root, not read: ../outside/secret_mask.png"
    for raw, image_id in outside.items():
        assert reason[image_id] == f"image path outside the dataset root, not read: {raw}"
    assert all(_one_line(r) for r in reason.values())
    masks = {r["image_id"]: r["mask_uri"] for r in store.read("images").to_pylist()}
    assert masks[f"{hid}/resized"] == masks[f"{hid}/empty"] == masks[f"{hid}/far_mask"] == ""
    assert sum(bool(m) for m in masks.values()) == 2  # the synthetic anomalies keep theirs
