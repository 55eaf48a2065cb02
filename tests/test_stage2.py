"""Stage 2 on the driver (no Ray): guides trained on an auxiliary dataset transfer to disjoint target categories,
results land in ``eval_results`` idempotently, stored coefficients reload exactly, and SPG through the one
evaluation loop gives exactly the numbers of a hand-written SPG evaluation on the same fixed store.

The planted signal: anomalous patches point along one SAE atom (e0) in every category, normal patches along a
shared atom (e1) plus a category-specific one; each anomalous image's mask PNG covers exactly its anomalous patches.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import numpy as np
import pytest
import torch
from PIL import Image

from spg_dist.data.imageio import load_mask
from spg_dist.errors import CategoryOverlapError, NoAuxiliaryDataError, SpgError
from spg_dist.evaluation import METRICS, evaluate_category, mean_over_categories
from spg_dist.stages.detect import detect
from spg_dist.stages.guides import load_spg, train_guides
from spg_dist.store.guides import UnknownGuidesError
from spg_dist.guides import GuideConfig, GuideTrainer, upsample
from spg_dist.sae import SAEConfig, TopKSAE
from spg_dist.store.connection import Store, write_fragment
from spg_dist.store.schemas import load_schema
from spg_dist.store.tokens import load_tokens, tokens_to_arrow

D, GRID, C = 8, 4, 16
SAE_ID = "bb/L3/stage2-test"
CATEGORY_AXIS = {"a0": 2, "a1": 3, "t0": 4, "t1": 5, "n0": 6}
# dataset -> (categories, normal images per category, anomalous images per category)
DATASETS = {"aux": (("a0", "a1"), 4, 4), "tgt": (("t0", "t1"), 4, 4), "normals": (("n0",), 3, 0)}


def make_stage2_store(tmp_path, seed=0) -> Store:
    rng = np.random.default_rng(seed)
    store = Store(tmp_path / "store")
    (tmp_path / "masks").mkdir()
    meta = {k: [] for k in ("backbone", "layer", "image_id", "dataset", "category", "split", "label", "image_size")}
    toks, images = [], []
    for ds, (cats, n_good, n_bad) in DATASETS.items():
        for cat in cats:
            for i in range(n_good + n_bad):
                bad = i >= n_good
                split = "test" if (bad or ds == "tgt" or i % 2) else "train"
                t = np.zeros((GRID, GRID, D))
                t[..., 1] = 1.0
                t[..., CATEGORY_AXIS[cat]] = 0.5
                mask_uri = ""
                if bad:
                    cells = rng.choice(GRID * GRID, size=rng.integers(1, 4), replace=False)
                    pix = np.zeros((32, 32), np.uint8)  # 8 px per patch; resized (nearest) to the mask size
                    for cell in cells:
                        r, c = divmod(int(cell), GRID)
                        t[r, c] = 0.0
                        t[r, c, 0] = 1.0
                        t[r, c, CATEGORY_AXIS[cat]] = 0.3
                        pix[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 255
                    mask_uri = str(tmp_path / "masks" / f"{ds}_{cat}_{i}.png")
                    Image.fromarray(pix).save(mask_uri)
                t += 0.1 * rng.standard_normal(t.shape)
                image_id = f"{ds}/{cat}/{split}/{'bad' if bad else 'good'}/{i:03d}"
                for k, v in dict(backbone="bb", layer=3, image_id=image_id, dataset=ds, category=cat, split=split,
                                 label=int(bad), image_size=32).items():
                    meta[k].append(v)
                toks.append(t)
                images.append(dict(image_id=image_id, dataset=ds, category=cat, split=split, label=int(bad),
                                   defect_type="bad" if bad else "good", image_uri=f"/nonexistent/{image_id}.png",
                                   mask_uri=mask_uri, width=32, height=32))
    store.commit_fragments("patch_tokens", write_fragment(store.lance_uri("patch_tokens"),
                                                          tokens_to_arrow(meta, np.stack(toks), "random-init"),
                                                          load_schema("patch_tokens")))
    store.upsert("images", images)
    return store


def register_sae_with_atoms(store: Store) -> TopKSAE:
    """W_dec = [I_8; I_8]: atom 0 is the anomaly direction, atom 1 the shared normal one."""
    sae = TopKSAE(SAEConfig(d=D, C=C, k=4), seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([torch.eye(D), torch.eye(D)]))
        sae.b_pre.zero_()
    store.upsert("sae_models", [dict(
        sae_id=SAE_ID, backbone="bb", layer=3, d=D, C=C, k=4, sparsifier="topk", run="test",
        config=json.dumps({"sae": sae.config.to_dict()}), metrics="{}", nmse=1.0, explained_variance=0.0, l0=4,
        dead_fraction=0.0, steps=0, tokens_seen=0, weights=sae.to_bytes(), firing_histogram_png=b"",
        run_dir="", created_at=dt.datetime(2026, 1, 1))])
    return sae


CONFIG = dataclasses.replace(GuideConfig.preset("classical"), steps=100, batch_images=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = make_stage2_store(tmp_path_factory.mktemp("stage2"))
    register_sae_with_atoms(store)
    row = train_guides(store, SAE_ID, "aux", CONFIG).row
    return store, row


def evaluate(store, guide_id, target, **kw):
    return detect(store, "spg", target, params={"guides": guide_id}, **kw).table


def test_guides_row(trained):
    store, row = trained
    assert store.count("guides") == 1
    assert row["guide_id"].startswith(f"{SAE_ID}/guides-aux-") and row["aux_dataset"] == "aux"
    assert row["steps"] == 100 and json.loads(row["curve"])[-1]["step"] == 100
    info = json.loads(row["config"])
    assert GuideConfig.from_dict(info["guide"]) == CONFIG and info["mask_size"] == GRID * 4
    assert row["active_normal"] == len(row["normal_indices"]) == len(row["normal_values"]) > 0
    assert row["active_anomaly"] == len(row["anomaly_indices"]) == len(row["anomaly_values"]) > 0
    assert min(row["anomaly_values"]) > 0 and min(row["normal_values"]) > 0
    # the stored (EMA) guides are the learned sparse ones, not the dense initialisation (16 atoms)
    assert row["active_anomaly"] < 16 and row["active_normal"] < 16
    # the anomaly guide leans on the planted atom(s) along e0 (atoms 0 and 8 of W_dec = [I; I])
    z = dict(zip(row["anomaly_indices"], row["anomaly_values"]))
    assert max(z, key=z.get) in (0, 8)


def test_transfer_to_disjoint_categories_and_eval_rows(trained):
    store, row = trained
    df = evaluate(store, row["guide_id"], "tgt")
    assert list(df.index) == ["t0", "t1", "mean"] and list(df.columns) == list(METRICS)
    assert (df["image_auroc"] > 0.9).all() and (df["pixel_auroc"] > 0.9).all(), df
    assert store.count("eval_results") == 3 * 4
    res = store.read("eval_results").to_pandas()
    mean = res[res.category == "mean"].set_index("metric")["value"]
    for m in METRICS:
        assert mean[m] == pytest.approx(df.loc["mean", m])
    assert set(res.detector) == {"spg"} and set(res.sae_id) == {SAE_ID} and set(res.aux_dataset) == {"aux"}
    # a re-run replaces its rows
    df2 = evaluate(store, row["guide_id"], "tgt")
    assert store.count("eval_results") == 3 * 4
    np.testing.assert_allclose(df2.to_numpy(), df.to_numpy())


def test_train_is_idempotent(trained):
    store, row = trained
    again = train_guides(store, SAE_ID, ["aux"], CONFIG)
    assert again.reused and again.guide_id == row["guide_id"] and again.row["created_at"] == row["created_at"]
    assert store.count("guides") == 1


def test_overlap_is_refused_unless_allowed(trained):
    store, row = trained
    with pytest.raises(CategoryOverlapError, match="a0"):
        evaluate(store, row["guide_id"], "aux")
    before = store.count("eval_results")
    df = evaluate(store, row["guide_id"], "aux", allow_overlap=True, run="in-domain")
    assert list(df.index) == ["a0", "a1", "mean"]
    assert store.count("eval_results", "run = 'in-domain'") == 3 * 4
    assert store.count("eval_results") == before + 3 * 4


def test_clear_errors(trained):
    store, _ = trained
    with pytest.raises(SpgError, match="no auxiliary tokens for bb layer 3, dataset nope.*spg extract"):
        train_guides(store, SAE_ID, "nope", CONFIG)
    with pytest.raises(NoAuxiliaryDataError, match="no anomalous image"):
        train_guides(store, SAE_ID, "normals", CONFIG)
    with pytest.raises(UnknownGuidesError, match="no guides 'no/such/guides'"):
        load_spg(store, "no/such/guides")
    assert issubclass(UnknownGuidesError, SpgError) and issubclass(CategoryOverlapError, ValueError)


def test_stored_coefficients_reload_to_the_same_maps(trained):
    """Re-run the same seeded training by hand: the reloaded guides give the trainer's EMA maps."""
    store, row = trained
    meta, toks = load_tokens(store, "bb", 3, dataset=["aux"])
    uris = dict(zip(*[store.read("images", columns=["image_id", "mask_uri"]).column(c).to_pylist()
                      for c in ("image_id", "mask_uri")]))
    size = GRID * 4
    masks = np.stack([load_mask(uris[i], size) for i in meta.column("image_id").to_pylist()])
    sae = TopKSAE.from_bytes(store.read("sae_models").column("weights")[0].as_py()).eval()
    tr = GuideTrainer(sae, CONFIG)
    rng = np.random.default_rng(CONFIG.seed)
    for _ in range(CONFIG.steps):
        pick = np.sort(rng.choice(len(toks), size=CONFIG.batch_images, replace=False))
        tr.step(torch.from_numpy(toks[pick]).float(), torch.from_numpy(masks[pick]))
    guides = load_spg(store, row["guide_id"])[0].guides
    torch.testing.assert_close(guides.coefficients(ema=True), tr.guides.coefficients(ema=True))
    assert guides.active_sets(ema=True) == (row["active_normal"], row["active_anomaly"])
    _, tgt = load_tokens(store, "bb", 3, dataset="tgt")
    x = torch.from_numpy(tgt).float()
    with torch.no_grad():
        torch.testing.assert_close(guides.patch_probs(x, ema=True), tr.guides.patch_probs(x, ema=True))


def test_cli_train_guides_and_evaluate(trained, tmp_path):
    from click.testing import CliRunner

    from spg_dist.cli import main

    store, row = trained
    r = CliRunner().invoke(main, ["evaluate", "--store", store.uri, "--guides", row["guide_id"], "--target", "tgt",
                                  "--run", "cli"])
    assert r.exit_code == 0, r.output
    assert "mean" in r.output and "pixel_auroc" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--store", store.uri, "--guides", row["guide_id"], "--target", "aux"])
    assert r.exit_code == 1 and "--allow-overlap" in r.output and "Traceback" not in r.output


def test_spg_through_the_loop_equals_a_hand_written_evaluation(trained):
    """The numbers of SPG before the one evaluation loop existed: EMA guides -> p_A per patch -> bilinear maps at
    4 x the grid -> max pooling -> the four metrics per category against the masks, by hand on the fixed store."""
    store, row = trained
    guides = load_spg(store, row["guide_id"])[0].guides
    meta, tgt = load_tokens(store, "bb", 3, dataset="tgt", split="test")
    uris = dict(zip(*[store.read("images", columns=["image_id", "mask_uri"]).column(c).to_pylist()
                      for c in ("image_id", "mask_uri")]))
    size = GRID * 4
    expected = {}
    cats = np.asarray(meta.column("category").to_pylist())
    for cat in sorted(set(cats)):
        sel = cats == cat
        with torch.no_grad():
            maps = upsample(guides.patch_probs(torch.from_numpy(tgt[sel]).float(), ema=True), size).numpy()
        ids = np.asarray(meta.column("image_id").to_pylist())[sel]
        masks = np.stack([load_mask(uris[i], size) if uris[i] else np.zeros((size, size), np.uint8) for i in ids])
        labels = np.asarray(meta.column("label").to_pylist())[sel]
        expected[cat] = evaluate_category(labels, maps.reshape(len(maps), -1).max(1), masks, maps)
    expected["mean"] = mean_over_categories(expected)
    got = evaluate(store, row["guide_id"], "tgt", run="hand-check")
    for cat, metrics in expected.items():
        for m, v in metrics.items():
            assert got.loc[cat, m] == pytest.approx(v, abs=1e-12), (cat, m)


def test_nan_guide_loss_is_one_line_in_the_cli(trained, tmp_path):
    """A non-finite guide loss (NaN tokens) is a user-facing error: one line from `spg train-guides`, no traceback."""
    from click.testing import CliRunner

    from spg_dist.cli import main

    store, _ = trained
    n = 4
    toks = np.full((n, GRID, GRID, D), np.nan)
    ids = [f"nanaux/c/test/bad/{i:03d}" for i in range(n)]
    meta = dict(backbone=["bb"] * n, layer=[3] * n, image_id=ids, dataset=["nanaux"] * n, category=["c"] * n,
                split=["test"] * n, label=[1] * n, image_size=[32] * n)
    store.commit_fragments("patch_tokens", write_fragment(store.lance_uri("patch_tokens"),
                                                          tokens_to_arrow(meta, toks, "random-init"),
                                                          load_schema("patch_tokens")))
    mask = tmp_path / "m.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    store.upsert("images", [dict(image_id=i, dataset="nanaux", category="c", split="test", label=1,
                                 defect_type="bad", image_uri="/x.png", mask_uri=str(mask), width=32, height=32)
                            for i in ids])
    r = CliRunner().invoke(main, ["train-guides", "--store", store.uri, "--sae", SAE_ID, "--aux", "nanaux",
                                  "--steps", "3"])
    assert r.exit_code == 1 and "guide loss is nan" in r.output.lower(), r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
