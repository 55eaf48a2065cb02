"""The store on ``s3://`` (moto's S3 API server on 127.0.0.1): the round trip through Store and plain LanceDB, storage
options from the environment (what the CLI gets), the pipeline with Ray workers writing to the bucket (extract,
train-sae, encode, detect, sweep), and exactly-once commits from spawned processes (Lance commits a version on S3
with a conditional put) against plain appends as the negative control."""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest
from s3server import BUCKET, moto_s3

from spg_dist.store import Store, load_schema, tokens_to_arrow, write_fragment

BACKBONE = "texture-filterbank"


@pytest.fixture(scope="session")
def s3_server():
    with moto_s3() as server:
        yield server


def _image_rows(ids, tag: str = "") -> list[dict]:
    return [dict(image_id=i, dataset="d", category="c", split="test", label=0, defect_type="good",
                 image_uri=f"/x/{i}{tag}.png", mask_uri="", width=32, height=32) for i in ids]


def _token_rows(ids: list[str], seed: int) -> pa.Table:
    n = len(ids)
    meta = dict(backbone=["bb"] * n, layer=[1] * n, image_id=ids, dataset=["d"] * n, category=["c"] * n,
                split=["test"] * n, label=[0] * n, image_size=[32] * n)
    return tokens_to_arrow(meta, np.random.default_rng(seed).standard_normal((n, 2, 2, 4)).astype(np.float16),
                           "random-init")


# ------------------------------------------------------------------------------------------------- round trip
def test_round_trip_store_and_plain_lancedb(s3_server):
    store = s3_server.make_store("roundtrip")
    assert store.upsert("images", _image_rows(["d/a", "d/b"])) == 2
    assert store.upsert("images", _image_rows(["d/b", "d/c"], tag="-v2")) == 2  # b updated, c added
    table = "patch_tokens"
    frags = write_fragment(store.lance_uri(table), _token_rows(["d/a", "d/b"], 0), load_schema(table),
                           store.storage_options)
    assert store.commit_fragments(table, frags) == 2
    again = write_fragment(store.lance_uri(table), _token_rows(["d/b", "d/c"], 1), load_schema(table),
                           store.storage_options)
    assert store.commit_fragments(table, again) == 1  # d/b is already stored: first writer wins
    assert store.lance_uri(table) == f"s3://{BUCKET}/roundtrip/patch_tokens.lance"

    # a user without this package reads the store with plain LanceDB and the same storage options
    db = lancedb.connect(store.uri, storage_options=s3_server.storage_options)
    assert {"images", "patch_tokens"} <= set(db.list_tables().tables)
    images = db.open_table("images").to_arrow().sort_by("image_id")
    assert images.column("image_id").to_pylist() == ["d/a", "d/b", "d/c"]
    assert images.column("image_uri").to_pylist() == ["/x/d/a.png", "/x/d/b-v2.png", "/x/d/c-v2.png"]
    toks = db.open_table(table).to_arrow()
    assert sorted(toks.column("image_id").to_pylist()) == ["d/a", "d/b", "d/c"]
    assert toks.schema.field("tokens").type == load_schema(table).arrow.field("tokens").type
    # and the objects really are in the bucket
    keys = s3_server.keys("roundtrip/")
    assert any(k.startswith("roundtrip/patch_tokens.lance/_versions/") for k in keys)
    assert any(k.startswith("roundtrip/patch_tokens.lance/data/") for k in keys)


def test_a_commit_against_an_old_version_conflicts_on_s3(s3_server):
    """The mechanism exactly-once rests on: a Merge at a read_version another writer has moved past is refused."""
    from lance.commit import CommitConflictError

    store = s3_server.make_store("conflict")
    store.upsert("images", _image_rows(["d/a"]))
    uri = store.lance_uri("images")
    ds = lance.dataset(uri, storage_options=store.storage_options)
    stale = ds.version
    store.upsert("images", _image_rows(["d/b"]))  # another writer commits meanwhile
    frags = lance.fragment.write_fragments(load_schema("images").validate(pa.Table.from_pylist(_image_rows(["d/c"]))),
                                           uri, storage_options=store.storage_options)
    with pytest.raises(CommitConflictError):
        lance.LanceDataset.commit(uri, lance.LanceOperation.Merge([f.metadata for f in ds.get_fragments()] + frags,
                                                                  ds.schema),
                                  read_version=stale, storage_options=store.storage_options)
    assert store.count("images") == 2


# -------------------------------------------------------------------------------------- options from the env
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "AWS_ALLOW_HTTP", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _user_env(monkeypatch, s3_server) -> None:
    """What a user of an S3-compatible server exports before `spg … --store s3://…`."""
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")


def test_storage_options_come_from_the_environment_and_travel_with_the_store(monkeypatch, s3_server):
    s3_server.make_store("fromenv").upsert("images", _image_rows(["d/a", "d/b"]))
    _user_env(monkeypatch, s3_server)
    store = Store(f"s3://{BUCKET}/fromenv")  # what every CLI command builds from --store
    # the connection settings are copied (so pickled into Ray workers they reach the same endpoint); credentials
    # are not: every process takes them from its own AWS chain
    assert store.storage_options == {"aws_endpoint": s3_server.endpoint, "allow_http": "true",
                                     "aws_region": "us-east-1"}
    assert store.count("images") == 2
    store.upsert("images", _image_rows(["d/c"]))
    # explicit options win over the environment; a local store takes nothing from it
    assert Store(store.uri, {"endpoint": "http://elsewhere:9000"}).storage_options["endpoint"] == \
        "http://elsewhere:9000"
    assert "aws_endpoint" not in (Store(store.uri, {"endpoint": "http://elsewhere:9000"}).storage_options or {})
    assert Store("/tmp/some-local-store").storage_options is None
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    copy = pickle.loads(pickle.dumps(store))  # a worker whose environment has no endpoint
    assert copy.storage_options == store.storage_options and copy.count("images") == 3


# ---------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def s3_tokens(ray_cluster, s3_server, tmp_path_factory):
    """Two tiny synthetic datasets extracted with Ray Data into an s3:// store: fragment writers in Ray workers write
    data files to the bucket, the driver commits them. One extraction run over both datasets' records."""
    from spg_dist.data.spec import list_records
    from spg_dist.data.synth import synthesize
    from spg_dist.ray.extract import extract

    root = tmp_path_factory.mktemp("s3data")
    for layout, cat in (("mvtec", "brick"), ("visa", "chelsea")):
        synthesize(root / f"synth_{layout}", layout=layout, seed=0, image_size=64, n_train=2, n_test_good=1,
                   n_test_bad=2, categories=[cat])
    records = list_records(f"mvtec:{root / 'synth_mvtec'}") + list_records(f"visa:{root / 'synth_visa'}")
    store = s3_server.make_store("pipeline")
    res = extract(store, f"mvtec:{root / 'synth_mvtec'}", BACKBONE, image_size=64, records=records,
                  progress=False)
    return store, root, res


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_on_s3(s3_tokens, s3_server, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from spg_dist.cli import main
    from spg_dist.ray.encode import encode
    from spg_dist.ray.train_sae import train_saes
    from spg_dist.stages.detect import detect
    from spg_dist.store import tokens

    store, _, res = s3_tokens
    assert not res.errors and res.rows_written == 10
    assert store.count("images") == 10 and store.count("patch_tokens") == 10
    assert any(k.startswith("pipeline/patch_tokens.lance/data/") for k in s3_server.keys("pipeline/"))
    meta = tokens.metadata(store, tokens.TokenSelection.of(BACKBONE, 1))
    assert sorted(set(meta.column("dataset").to_pylist())) == ["synth_mvtec", "synth_visa"]

    # Stage 1 on an s3 store: checkpoints go to a local folder (the worker loop writes them with file APIs);
    # the weights land in sae_models on s3
    trained = train_saes(store, BACKBONE, Cs=[32], ks=[4], dataset=["synth_visa"], split=None, epochs=1,
                         batch_tokens=32, engine="local", storage_path=str(tmp_path / "runs"))
    (sae_id,) = trained.sae_ids
    assert trained.run_dir.startswith(str(tmp_path / "runs"))
    assert store.count("sae_models") == 1

    enc = encode(store, sae_id, progress=False)  # Ray Data actors write sae_codes/atom_index fragments to s3
    assert enc.images_encoded == 10 and store.count("sae_codes") == 10

    ev = detect(store, "knn", "synth_mvtec", backbone=BACKBONE, params={"shots": 2})
    assert store.count("eval_results", f"run = '{ev.run}'") > 0
    assert 0.0 <= float(ev.table.loc["mean", "image_auroc"]) <= 1.0

    # a user's CLI with the connection in the environment sees the same store
    _user_env(monkeypatch, s3_server)
    r = CliRunner().invoke(main, ["saes", "--store", store.uri])
    assert r.exit_code == 0 and sae_id in r.output, r.output


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_sweep_on_s3(s3_tokens):
    """A sweep's trial group runs as a Ray task that gets the store by URI and storage options, and records its
    trial and results in the s3 store."""
    from spg_dist.ray.sweep import run_sweep
    from spg_dist.stages.plans import SweepPlan

    store, _, _ = s3_tokens
    plan = SweepPlan.from_dict(dict(
        name="s3-sweep", grid=dict(backbone=[BACKBONE], layer=[-1], C=[32], k=[4], detectors=["knn"],
                                   direction=["synth_visa->synth_mvtec"], pooling=["max"]),
        detector_params={"knn": {"shots": 2}}, resources={"cpus": 1, "gpus": 0}))
    result = run_sweep(store, plan, progress=False, echo=lambda _: None)
    assert (result.trials, result.finished, result.failed) == (1, 1, 0), result.errors
    trials = store.read("sweep_trials", where="sweep_id = 's3-sweep'").to_pylist()
    assert [t["status"] for t in trials] == ["finished"]
    assert store.count("eval_results", f"run = '{trials[0]['run']}'") > 0
    again = run_sweep(store, plan, progress=False, echo=lambda _: None)  # resumable: nothing left to do
    assert (again.finished, again.skipped) == (0, 1)


# -------------------------------------------------------------------------------------------- exactly once
WORKERS, ROUNDS = 3, 3


def _ids(worker: int, r: int) -> list[str]:
    return [f"d/img{(worker + r + j) % 10:03d}" for j in range(5)]  # heavy overlap between writers and rounds


IDS = sorted({i for w in range(WORKERS) for r in range(ROUNDS) for i in _ids(w, r)})


def _writer(prefix: str, options: dict, worker: int, barrier) -> None:
    protocol = Store(f"s3://{BUCKET}/{prefix}/protocol", options)
    plain_uri = f"s3://{BUCKET}/{prefix}/plain/patch_tokens.lance"
    table = load_schema("patch_tokens")
    uri = protocol.lance_uri("patch_tokens")
    barrier.wait()  # every process starts its commits at the same moment
    for r in range(ROUNDS):
        rows = _token_rows(_ids(worker, r), seed=worker * 100 + r)
        protocol.commit_fragments("patch_tokens", write_fragment(uri, rows, table, options))
        protocol.upsert("images", _image_rows(_ids(worker, r), tag=f"-w{worker}"))
    barrier.wait()
    for r in range(ROUNDS):  # the negative control: plain appends of the same rows
        lance.write_dataset(_token_rows(_ids(worker, r), seed=worker * 100 + r), plain_uri, mode="append",
                            storage_options=options)


class _Refused(logging.Handler):
    """Counts the manifest PUTs the S3 server refused (HTTP 412: a conditional put lost to another writer)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.refused = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if ".manifest" in msg and '" 412 ' in msg and "PUT " in msg:
            self.refused += 1


@pytest.mark.timeout(240)
def test_concurrent_writers_store_every_key_once_on_s3(s3_server):
    prefix = "race"
    options = dict(s3_server.storage_options)
    protocol = Store(f"s3://{BUCKET}/{prefix}/protocol", options)
    for name in ("patch_tokens", "images"):  # created once, before the race
        protocol.table(name)
    lance.write_dataset(load_schema("patch_tokens").arrow.empty_table(),
                        f"s3://{BUCKET}/{prefix}/plain/patch_tokens.lance", storage_options=options)
    werkzeug = logging.getLogger("werkzeug")
    counter, level = _Refused(), werkzeug.level
    werkzeug.addHandler(counter)
    werkzeug.setLevel(logging.INFO)
    try:
        ctx = mp.get_context("spawn")  # never fork after Lance started its runtime
        barrier = ctx.Barrier(WORKERS)
        procs = [ctx.Process(target=_writer, args=(prefix, options, w, barrier)) for w in range(WORKERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=200)
        assert [p.exitcode for p in procs] == [0] * WORKERS
    finally:
        werkzeug.removeHandler(counter)
        werkzeug.setLevel(level)

    tok = protocol.read("patch_tokens", columns=["image_id"]).column("image_id").to_pylist()
    img = protocol.read("images", columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(tok) == IDS and sorted(img) == IDS  # rows = distinct keys
    plain = lance.dataset(f"s3://{BUCKET}/{prefix}/plain/patch_tokens.lance", storage_options=options)
    # the same workload without the protocol stores overlapping keys more than once
    assert plain.count_rows() == WORKERS * ROUNDS * 5 > len(IDS)
    print(f"s3 race: {counter.refused} manifest PUTs refused with HTTP 412 (conditional put lost to another writer)")
