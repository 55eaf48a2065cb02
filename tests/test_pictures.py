"""Pictures people can read, and one definition of a dead latent.

Dead = not fired in the last ``dead_tokens`` training tokens (Gao et al. 2024). The training log (the last step's
metrics), the tracker at the end of training, the record stored with the model (``sae_models.metrics["latents"]``,
its ``dead_fraction`` column, the histogram) and ``atom_stats``'s ``dead`` column are the same quantity; latents
merely silent on the encoded images are counted apart. Galleries have a labelled colour bar, short titles naming
the atom, values on every tile and the image (with its defect outlined) next to the heat; ``write_sae_figures``
writes the histogram and training curves of a stored SAE; ``method_overlays`` puts methods side by side.
No Ray: the tiny SAE is trained in-process and registered as ``spg_dist.ray.train_sae.register`` would.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from spg_dist.sae import MultiSAETrainer, SAEConfig, TrainConfig, firing_frequency_histogram_png
from spg_dist.sae.tracker import DeadLatentTracker, unpack_mask
from spg_dist.store import Store, codes, load_schema, sae_models, write_fragment
from spg_dist.store.atoms import atom_stats, top_patches
from spg_dist.viz.atoms import atom_gallery_figure, atom_gallery_png, atom_stats_png
from spg_dist.viz.overlays import method_overlays, method_overlays_figure
from spg_dist.viz.sae_figures import CURVES_FILE, HISTOGRAM_FILE, short_sae_label, write_sae_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
D, C, K, DEAD_TOKENS, BATCH, STEPS = 16, 32, 4, 512, 256, 8
NEVER = list(range(24, 30))   # planted: never fire (zero encoder rows, negative bias) -> dead
LATE = [30, 31]               # planted: fire, then silenced after step KILL_AT -> dead, but with firings
KILL_AT = 4                   # silent for the last STEPS - KILL_AT = 4 steps = 1024 > DEAD_TOKENS tokens
GH = GW = 4


def _silence(trainer: MultiSAETrainer, latents: list[int]) -> None:
    with torch.no_grad():
        trainer.saes[0].W_enc[latents] = 0
        trainer.saes[0].b_enc[latents] = -1.0


@pytest.fixture(scope="module")
def trained():
    """A tiny SAE trained STEPS steps with planted dead latents, and its log (metrics of every step)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(STEPS * BATCH, D, generator=g)
    cfg = SAEConfig(d=D, C=C, k=K, auxk=False, dead_tokens=DEAD_TOKENS, init_b_pre="mean")
    trainer = MultiSAETrainer([cfg], TrainConfig(lr=1e-3, autocast_bf16=False, seed=0))
    trainer.init_from_sample(X)
    _silence(trainer, NEVER)
    log = []
    for s in range(STEPS):
        if s == KILL_AT:
            _silence(trainer, LATE)
        log.append(trainer.step(X[s * BATCH:(s + 1) * BATCH])[0])
    return trainer, log


def _register_row(trainer: MultiSAETrainer, log: list[dict], sae_id: str) -> dict:
    """The sae_models row as spg_dist.ray.train_sae.register writes it (with the dead-latent record)."""
    cfg, sae, tracker = trainer.configs[0], trainer.saes[0], trainer.trackers[0]
    final = log[-1]
    return dict(sae_id=sae_id, backbone="bb", layer=1, d=cfg.d, C=cfg.C, k=cfg.k, sparsifier=cfg.sparsifier,
                run="r", config=json.dumps({"sae": cfg.to_dict(), "train": trainer.train.to_dict()}),
                metrics=json.dumps({"final": final, "curve": log, "latents": tracker.record()}),
                nmse=final["nmse"], explained_variance=final["explained_variance"], l0=final["l0"],
                dead_fraction=tracker.dead_fraction(), steps=trainer.steps[0], tokens_seen=trainer.tokens[0],
                weights=sae.to_bytes(),
                firing_histogram_png=firing_frequency_histogram_png(tracker.fire_counts, tracker.tokens_observed,
                                                                    dead=tracker.dead_mask()),
                run_dir="/tmp", created_at=dt.datetime(2025, 1, 1))


IMAGES = [(f"d/bottle/test/{i:03d}", "bottle", i % 2) for i in range(4)]


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained):
    """A store holding the trained SAE's row, four images (two anomalous, with masks) and planted codes."""
    tmp = tmp_path_factory.mktemp("pictures")
    s = Store(tmp / "store")
    s.upsert("sae_models", [_register_row(*trained, "bb/L1/topk-C32-k4/a-rather-long-run-name-2025-01-01T00-00-00")])
    rng = np.random.default_rng(1)
    rows, code_rows = [], []
    for iid, cat, label in IMAGES:
        path = tmp / (iid.replace("/", "_") + ".png")
        Image.fromarray(rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)).save(path)
        mask_uri = ""
        if label:
            m = np.zeros((64, 64), np.uint8)
            m[16:40, 20:44] = 255
            mask_uri = str(tmp / (iid.replace("/", "_") + "_mask.png"))
            Image.fromarray(m).save(mask_uri)
        rows.append(dict(image_id=iid, dataset="d", category=cat, split="test", label=label,
                         defect_type="bad" if label else "good", image_uri=str(path), mask_uri=mask_uri,
                         width=64, height=64))
        idx = np.stack([rng.permutation(20)[:K] for _ in range(GH * GW)]).astype(np.int32)
        idx[5, 0] = 7                                   # atom 7 fires strongly on patch 5 of every image
        val = rng.uniform(0.1, 1.0, (GH * GW, K)).astype(np.float32)
        val[5, 0] = 3.0 + label
        code_rows.append(dict(sae_id=_sid(s), image_id=iid, dataset="d", category=cat, split="test", label=label,
                              grid_h=GH, grid_w=GW, k=K, indices=idx.ravel().tolist(), values=val.ravel().tolist()))
    s.upsert("images", rows)
    schema = load_schema("sae_codes")
    codes.commit(s, write_fragment(codes.lance_uri(s), schema.validate(pa.Table.from_pylist(code_rows)), schema))
    codes.build_atoms(s, _sid(s), top_n=8)
    return s, tmp


def _sid(s: Store) -> str:
    return s.read("sae_models", columns=["sae_id"]).column("sae_id")[0].as_py()


# ------------------------------------------------------------------------------------- one dead definition
def test_tracker_dead_latents_on_a_hand_built_case():
    """C=8, dead after 100 tokens. Steps of 50, 60, 60 tokens; latents 0-5 fire in step 1, 0-3 in step 2, 0-1 in
    step 3. Tokens since fired: [0, 0, 60, 60, 120, 120, 170, 170] -> dead: 4, 5 (fired, then silent 120 > 100)
    and 6, 7 (never fired)."""
    tr = DeadLatentTracker(8, dead_tokens=100)
    for n, fired in ((50, range(6)), (60, range(4)), (60, range(2))):
        idx = torch.tensor([list(fired)])
        tr.update(idx, torch.ones_like(idx, dtype=torch.float32), n_tokens=n)
    assert tr.tokens_since_fired.tolist() == [0, 0, 60, 60, 120, 120, 170, 170]
    assert tr.dead_mask().nonzero().ravel().tolist() == [4, 5, 6, 7] and tr.dead_fraction() == 0.5
    rec = tr.record()
    assert rec["n_dead"] == 4 and rec["dead_fraction"] == 0.5 and rec["dead_tokens"] == 100
    assert unpack_mask(rec["dead_mask"], 8).nonzero()[0].tolist() == [4, 5, 6, 7]
    assert rec["n_never_fired"] == 2 and rec["n_never_fired_dead"] == 2
    assert sum(rec["alive_counts"]) == 4 and sum(rec["dead_counts"]) == 2   # 4, 5 fired once, then died
    json.dumps(rec)


def test_log_tracker_store_and_stats_report_the_same_dead_latents(trained, store):
    trainer, log = trained
    s, _ = store
    tracker = trainer.trackers[0]
    counts = tracker.fire_counts
    assert all(int(counts[i]) > 0 for i in LATE) and all(int(counts[i]) == 0 for i in NEVER)
    want = sorted(NEVER + LATE)                                   # everything else fired in the last 512 tokens
    assert tracker.dead_mask().nonzero().ravel().tolist() == want
    # training log: the last step's dead fraction is the tracker's after that step
    assert log[-1]["dead_fraction"] == pytest.approx(tracker.dead_fraction()) == len(want) / C
    # stored with the model: the column, the record and its mask
    row = sae_models.get(s, _sid(s), with_weights=False)
    rec = sae_models.latent_record(row)
    assert row["dead_fraction"] == pytest.approx(len(want) / C)
    assert rec["n_dead"] == len(want) and rec["dead_fraction"] == pytest.approx(row["dead_fraction"])
    assert rec["dead_mask"].nonzero()[0].tolist() == want and rec["dead_tokens"] == DEAD_TOKENS
    # atoms stats: `dead` is the stored record; silence on the encoded images is a different column
    df = atom_stats(s, _sid(s))
    assert df["dead"].to_numpy(dtype=bool).nonzero()[0].tolist() == want
    assert df.attrs["training_dead"]["n_dead"] == len(want)
    silent = (df["count"] == 0).to_numpy().nonzero()[0].tolist()   # planted codes use atoms 0-19 only
    assert silent == list(range(20, C)) and silent != want


def test_rejected_step_leaves_the_tracker_untouched():
    X = torch.randn(512, D)
    trainer = MultiSAETrainer([SAEConfig(d=D, C=C, k=K, dead_tokens=64)], TrainConfig(autocast_bf16=False))
    trainer.init_from_sample(X)
    trainer.step(X[:256])
    before = trainer.trackers[0].snapshot()
    bad = X[256:].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(Exception, match="step 2"):
        trainer.step(bad)
    after = trainer.trackers[0]
    assert torch.equal(after.tokens_since_fired, before[0]) and torch.equal(after.fire_counts, before[1])
    assert (after.tokens_seen, after.tokens_observed) == before[2:]


# ---------------------------------------------------------------------------------------------- SAE figures
def test_write_sae_figures(store, tmp_path):
    s, _ = store
    paths = write_sae_figures(s, _sid(s), tmp_path / "out")
    assert [p.name for p in paths] == [HISTOGRAM_FILE, CURVES_FILE]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and Image.open(p).size[0] > 500
    # a row from before the record existed: the PNG stored at training time, no curves
    old = {**sae_models.get(s, _sid(s)), "sae_id": "old/sae", "metrics": "{}", "firing_histogram_png": b"\x89PNGold"}
    s.upsert("sae_models", [old])
    try:
        paths = write_sae_figures(s, "old/sae", tmp_path / "old")
        assert [p.name for p in paths] == [HISTOGRAM_FILE] and paths[0].read_bytes() == b"\x89PNGold"
    finally:
        s.table("sae_models").delete("sae_id = 'old/sae'")
    with pytest.raises(sae_models.UnknownSAEError):
        write_sae_figures(s, "no/such/sae", tmp_path / "none")


def test_sae_figures_of_an_older_row_come_from_its_checkpoint(trained, store, tmp_path):
    """A row registered before the record was stored: the run's final checkpoint (when here) gives the record."""
    from spg_dist.sae import save_checkpoint
    from spg_dist.sae.checkpoint import latent_record_from_run

    trainer, _ = trained
    s, _ = store
    save_checkpoint(trainer, tmp_path / "run" / "checkpoint_000000008")
    rec = latent_record_from_run(tmp_path / "run", trainer.configs[0].to_dict(), steps=STEPS)
    assert rec == trainer.trackers[0].record()
    assert latent_record_from_run(tmp_path / "run", trainer.configs[0].to_dict(), steps=STEPS + 1) is None
    old = {**sae_models.get(s, _sid(s)), "sae_id": "older/sae", "firing_histogram_png": b"stale",
           "metrics": json.dumps({"curve": json.loads(sae_models.get(s, _sid(s))["metrics"])["curve"]}),
           "run_dir": str(tmp_path / "run")}
    s.upsert("sae_models", [old])
    try:
        paths = write_sae_figures(s, "older/sae", tmp_path / "older")
        assert [p.name for p in paths] == [HISTOGRAM_FILE, CURVES_FILE]
        assert paths[0].read_bytes()[:8] == PNG_MAGIC          # redrawn, not the stale stored bytes
    finally:
        s.table("sae_models").delete("sae_id = 'older/sae'")


def test_histogram_figure_marks_dead_latents(trained):
    from spg_dist.viz.sae_figures import firing_histogram_figure

    rec = trained[0].trackers[0].record()
    fig = firing_histogram_figure(rec, short_sae_label({"C": C, "k": K}))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() and ax.get_ylabel() == "latents"
    assert ax.get_title() == f"SAE C={C} k={K}: firing frequency of {C} latents" and len(ax.get_title()) < 60
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert f"dead ({len(NEVER) + len(LATE)}," in legend and "last 512 training tokens" in legend


# -------------------------------------------------------------------------------------------------- gallery
def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_gallery_is_readable(store):
    s, tmp = store
    rows = top_patches(s, _sid(s), 7, 4)
    fig = atom_gallery_figure(s, _sid(s), 7, rows, role="anomaly-guide", coefficient=0.118)
    title = fig._suptitle.get_text()
    assert title == f"anomaly-guide atom 7 · coefficient 0.118 · SAE C={C} k={K}" and len(title) < 60
    (cbar,) = _colorbars(fig)
    assert "activation" in cbar.get_ylabel() and "atom 7" in cbar.get_ylabel()
    tiles = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(tiles) == 3 * len(rows)                            # crop | image | activation over image
    crops, images_, heats = tiles[0::3], tiles[1::3], tiles[2::3]
    for r, ax in zip(rows.to_pylist(), crops):                    # every tile states its value and category
        assert f"activation {r['value']:.3g}" in ax.get_title() and r["category"] in ax.get_title()
    anomalous = [ax for ax in images_ if "[anomalous]" in ax.get_title()]
    assert anomalous and all(ax.collections for ax in anomalous)  # ground-truth contour beside the heat
    for ax in heats:
        heat = ax.get_images()[1]
        assert np.max(heat.get_alpha()) <= 0.6 + 1e-6            # the image stays visible under the heat
    plain = atom_gallery_figure(s, _sid(s), 7, rows)
    assert len(plain._suptitle.get_text()) < 60 and "atom 7" in plain._suptitle.get_text()
    out = atom_gallery_png(s, _sid(s), 7, rows, tmp / "png/gallery.png", role="anomaly-guide", coefficient=0.118)
    assert out.read_bytes()[:8] == PNG_MAGIC and Image.open(out).size[0] > 600


def test_atom_stats_png_names_both_numbers(store):
    s, tmp = store
    out = atom_stats_png(atom_stats(s, _sid(s)), tmp / "png/stats.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------- method overlays
def test_method_overlays(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 10:30] = 1
    masks = [mask, None, np.zeros((48, 64))]
    maps = {"SPG": [rng.random((12, 16)) for _ in range(3)], "kNN": [10 + 5 * rng.random((48, 64)) for _ in range(3)]}
    titles = ["bottle/001", "bottle/002", "cable/003"]
    fig = method_overlays_figure(images, masks, maps, titles, vmax={"kNN": 20.0})
    cbars = _colorbars(fig)
    assert len(cbars) == 2                                        # one per method column, each its own scale
    assert [c.get_xlabel().split(" ")[0] for c in cbars] == ["SPG", "kNN"] and "20" in cbars[1].get_xlabel()
    assert [ax.get_title() for ax in fig.axes[1:3]] == ["SPG", "kNN"]
    assert fig.axes[0].collections                                # ground-truth contour on the first image
    out = method_overlays(images, masks, maps, titles, tmp_path / "m.png", vmax={"kNN": 20.0})
    assert out.read_bytes()[:8] == PNG_MAGIC
    w, h = Image.open(out).size
    assert w > 600 and h > 600
    with pytest.raises(ValueError, match="must be equal"):
        method_overlays(images[:2], masks, maps, ["a", "b", "c"], tmp_path / "bad.png")
