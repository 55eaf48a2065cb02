"""An S3-API server for tests: moto in server mode on 127.0.0.1, one bucket, and stores on it.

:func:`moto_s3` (a context manager) and the session fixture ``s3_server`` built on it yield an :class:`S3Server`:
``endpoint``, ``bucket``, ``storage_options`` (what a user passes for an S3-compatible endpoint) and
``make_store(prefix)`` (a :class:`~spg_dist.store.Store` at ``s3://BUCKET/<prefix>``); it also unpacks as
``endpoint, storage_options, make_store``. tests/ is on sys.path (as for ``cluster``): ``from s3server import
moto_s3`` and wrap it in a fixture, or import ``s3_server`` itself into a test module.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

BUCKET = "spg-test"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storage_options_for(endpoint: str) -> dict[str, str]:
    """Storage options for an S3-compatible endpoint over plain HTTP (Lance / object_store keys)."""
    return {"aws_endpoint": endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
            "aws_region": REGION, "allow_http": "true"}


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    storage_options: dict[str, str]
    make_store: Callable[[str | None], object]

    def __iter__(self):  # endpoint, storage_options, make_store = s3_server
        return iter((self.endpoint, self.storage_options, self.make_store))

    def uri(self, prefix: str | None = None) -> str:
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:8]}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                            aws_secret_access_key="test", region_name=REGION)

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` (no leading bucket)."""
        out, token = [], None
        client = self.client()
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = client.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


@contextmanager
def moto_s3() -> Iterator[S3Server]:
    """moto's ThreadedMotoServer on a free 127.0.0.1 port with one bucket, stopped on exit."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]' boto3)")
    import boto3
    from moto.server import ThreadedMotoServer

    from spg_dist.store import Store

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name=REGION).create_bucket(Bucket=BUCKET)
        options = storage_options_for(endpoint)

        def make_store(prefix: str | None = None) -> Store:
            return Store(f"s3://{BUCKET}/{prefix or uuid.uuid4().hex[:8]}", storage_options=dict(options))

        yield S3Server(endpoint, BUCKET, options, make_store)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with moto_s3() as server:
        yield server
