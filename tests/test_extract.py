"""Distributed extraction on a real local Ray: rows per readable image, tokens equal a direct backbone call,
idempotent re-runs, errors rows for bad files, the CLI and its one-line errors."""

from __future__ import annotations

import shutil

import lancedb
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spg_dist.backbones import create_backbone
from spg_dist.cli import main
from spg_dist.data.imageio import load_image
from spg_dist.data.spec import list_records
from spg_dist.ray.extract import extract
from spg_dist.store import Store, load_tokens

pytestmark = pytest.mark.ray
SIZE = 64  # tiny-dinov3 has patch 16: a 4x4 grid keeps the tests fast


@pytest.fixture()
def dataset(synth_mvtec, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synth_mvtec, root)
    return root


def test_extract_matches_direct_backbone_call_and_is_idempotent(ray_cluster, dataset, tmp_path):
    store = Store(tmp_path / "store")
    spec = f"mvtec:{dataset}"
    records = list_records(spec)
    res = extract(store, spec, "tiny-dinov3", image_size=SIZE, batch_size=4, progress=False)
    assert res.rows_written == len(records) and not res.errors

    tbl = lancedb.connect(store.uri).open_table("patch_tokens")  # plain lancedb, no spg_dist
    assert tbl.count_rows() == len(records)
    assert lancedb.connect(store.uri).open_table("images").count_rows() == len(records)

    meta, toks = load_tokens(store, "tiny-dinov3", res.layers[0])
    assert toks.shape == (len(records), 4, 4, 64) and toks.dtype == np.float16
    model = create_backbone("tiny-dinov3", image_size=SIZE)
    by_id = {r.image_id: r for r in records}
    ids = meta.column("image_id").to_pylist()[:5]
    pixels = torch.from_numpy(np.stack([load_image(by_id[i].image_uri, SIZE) for i in ids]))
    direct = model.encode(pixels)[res.layers[0]].to(torch.float16).numpy()
    np.testing.assert_allclose(toks[:5].astype(np.float32), direct.astype(np.float32), rtol=1e-3, atol=1e-3)

    again = extract(store, spec, "tiny-dinov3", image_size=SIZE, batch_size=4, progress=False)
    assert again.rows_written == 0 and again.images_skipped == len(records)
    assert tbl.count_rows() == len(records)


def test_bad_files_become_errors_rows(ray_cluster, dataset, tmp_path):
    store = Store(tmp_path / "store")
    records = list_records(f"mvtec:{dataset}")
    bad = next(r for r in records if r.label == 0)
    data = open(bad.image_uri, "rb").read()
    open(bad.image_uri, "wb").write(data[: len(data) // 2])  # truncated PNG
    unmasked = next(r for r in records if r.label == 1)
    import os

    os.remove(unmasked.mask_uri)
    res = extract(store, f"mvtec:{dataset}", "tiny-dinov3", image_size=SIZE, batch_size=4, progress=False)
    errs = store.read("errors").to_pylist()
    assert {(e["stage"], e["image_id"]) for e in errs} == {("decode", bad.image_id), ("mask", unmasked.image_id)}
    assert bad.image_uri in next(e["reason"] for e in errs if e["stage"] == "decode")
    # every readable image is written, the one without a mask included (image-level metrics can still use it)
    assert res.rows_written == len(records) - 1 == store.count("patch_tokens")
    # a re-run retries the bad file, fails the same way, and updates its errors row instead of adding one
    extract(store, f"mvtec:{dataset}", "tiny-dinov3", image_size=SIZE, batch_size=4, progress=False)
    assert store.count("errors") == 2 and store.count("patch_tokens") == len(records) - 1


def test_new_layers_are_added_without_duplicating_old_ones(ray_cluster, dataset, tmp_path):
    store = Store(tmp_path / "store")
    spec = f"mvtec:{dataset}"
    n = len(list_records(spec, categories=list_records(spec)[0].category))
    cat = list_records(spec)[0].category
    extract(store, spec, "tiny-dinov3", image_size=SIZE, layers=[1], categories=[cat], progress=False)
    res = extract(store, spec, "tiny-dinov3", image_size=SIZE, layers=[1, 2], categories=[cat], progress=False)
    assert res.rows_written == n
    assert store.count("patch_tokens", "layer = 1") == n == store.count("patch_tokens", "layer = 2")


def test_cli_extract_and_one_line_errors(ray_cluster, dataset, tmp_path):
    runner = CliRunner()
    store = str(tmp_path / "store")
    r = runner.invoke(main, ["extract", "--dataset", f"mvtec:{dataset}", "--backbone", "tiny-dinov3", "--store", store,
                             "--image-size", str(SIZE), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "patch_tokens rows written" in r.output
    assert Store(store).count("patch_tokens") == len(list_records(f"mvtec:{dataset}"))

    r = runner.invoke(main, ["extract", "--dataset", f"mvtec:{tmp_path}/nope", "--store", store])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["extract", "--dataset", f"mvtec:{dataset}", "--backbone", "resnet-9000", "--store", store])
    assert r.exit_code == 1 and "tiny-dinov3" in r.output and "dinov3-vitl16" in r.output


def test_mismatched_weights_fail_clearly(ray_cluster, dataset, tmp_path):
    from spg_dist.backbones import save_backbone

    path = save_backbone(create_backbone("tiny-dinov2"), str(tmp_path / "dinov2_weights"))
    r = CliRunner().invoke(main, ["extract", "--dataset", f"mvtec:{dataset}", "--backbone", "tiny-dinov3",
                                  "--weights", path, "--store", str(tmp_path / "s"), "--image-size", str(SIZE)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output


def test_corrupted_copies_are_stored_paired_and_keyed(ray_cluster, dataset, tmp_path):
    """`--corruptions 2`: two CutPaste copies of every normal train image, paired with it by source_image_id, their
    masks in `corruptions`, skipped by every reader that does not ask for them; a re-run adds nothing."""
    from spg_dist.data.imageio import load_image
    from spg_dist.stages.inputs import decode_png_mask
    from spg_dist.store import images, tokens
    from spg_dist.store.tokens import TokenSelection

    store = Store(tmp_path / "store")
    spec = f"mvtec:{dataset}"
    records = list_records(spec)
    normal_train = [r for r in records if r.split == "train" and r.label == 0]
    res = extract(store, spec, "tiny-dinov3", image_size=SIZE, batch_size=4, corruptions=2, progress=False)
    assert res.rows_written == len(records) + 2 * len(normal_train) == store.count("patch_tokens")
    assert store.count("corruptions") == 2 * len(normal_train) and store.count("images") == len(records)
    meta, _ = load_tokens(store, "tiny-dinov3", res.layers[0])  # a plain reader sees the dataset only
    assert meta.num_rows == len(records)
    src = normal_train[0].image_id
    copies = tokens.corrupted_metadata(store, "tiny-dinov3", res.layers[0], [src])
    assert copies.column("image_id").to_pylist() == [f"{src}#cutpaste1", f"{src}#cutpaste2"]
    assert set(copies.column("source_image_id").to_pylist()) == {src} and set(copies.column("label").to_pylist()) == {1}
    masks = images.corruption_masks(store, copies.column("image_id").to_pylist())
    m = decode_png_mask(masks[f"{src}#cutpaste1"])
    assert m.shape == (SIZE, SIZE) and 0 < m.sum() < SIZE * SIZE
    # the corrupted tokens differ from the clean ones where the image was changed, and equal the backbone's
    # own tokens of the corrupted pixels (re-made from the seed)
    import numpy as np
    from spg_dist.data.corruptions import corruption_seed, cutpaste

    _, clean = load_tokens(store, TokenSelection.of("tiny-dinov3", res.layers[0], image_ids=[src]))
    _, bad = load_tokens(store, TokenSelection.of("tiny-dinov3", res.layers[0], image_ids=[f"{src}#cutpaste1"],
                                                  sources=[src]))
    assert not np.allclose(clean, bad)
    pixels, mask = cutpaste(load_image(normal_train[0].image_uri, SIZE), np.random.default_rng(corruption_seed(src, 1)))
    np.testing.assert_array_equal(mask, m)
    direct = create_backbone("tiny-dinov3", image_size=SIZE).encode(torch.from_numpy(pixels[None]))[res.layers[0]]
    np.testing.assert_allclose(bad[0].astype(np.float32), direct[0].to(torch.float16).numpy().astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    again = extract(store, spec, "tiny-dinov3", image_size=SIZE, batch_size=4, corruptions=2, progress=False)
    assert again.rows_written == 0 and store.count("patch_tokens") == res.rows_written
    assert store.count("corruptions") == 2 * len(normal_train)


def test_token_after_the_final_norm(ray_cluster, dataset, tmp_path):
    """`--token norm`: the last block's tokens after the model's final norm (last_hidden_state), stored under
    `<backbone>+norm` with token='norm'; the classical encoder (no final norm) is refused in one line."""
    store = Store(tmp_path / "store")
    spec = f"mvtec:{dataset}"
    records = list_records(spec)
    res = extract(store, spec, "tiny-dinov3", image_size=SIZE, token="norm", progress=False)
    assert res.backbone_id == "tiny-dinov3+norm" and res.rows_written == len(records)
    meta, toks = load_tokens(store, "tiny-dinov3+norm", res.layers[0])
    assert set(meta.column("token").to_pylist()) == {"norm"}
    model = create_backbone("tiny-dinov3", image_size=SIZE)
    by_id = {r.image_id: r for r in records}
    ids = meta.column("image_id").to_pylist()[:3]
    pixels = torch.from_numpy(np.stack([load_image(by_id[i].image_uri, SIZE) for i in ids]))
    direct = model.encode(pixels, token="norm")[res.layers[0]].to(torch.float16).numpy()
    np.testing.assert_allclose(toks[:3].astype(np.float32), direct.astype(np.float32), rtol=1e-3, atol=1e-3)
    r = CliRunner().invoke(main, ["extract", "--dataset", spec, "--backbone", "texture-filterbank", "--token", "norm",
                                  "--store", str(tmp_path / "s2")])
    assert r.exit_code == 1 and "has no final norm" in r.output and "Traceback" not in r.output
