"""A real S3 endpoint for tests: moto's HTTP server on 127.0.0.1, in this process.

A test module asks for it with `pytest_plugins = ["s3_server"]` and the `s3_server` fixture (one server per
session). Import this module in tests only under `TYPE_CHECKING`: imported first, pytest can no longer register
it as a plugin (PytestAssertRewriteWarning, an error here). Clients get fake credentials through
`StorageSettings`; nothing touches the process environment or ~/.aws.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from elite.data.storage import StorageSettings

BUCKET = "elite-test"


class MotoS3:
    """moto's threaded server; moto keeps its buckets in process memory, so they survive a restart."""

    def __init__(self, bucket: str = BUCKET, port: int = 0) -> None:
        self.bucket = bucket  # created by the fixture; tests share it and keep apart by key prefix
        self.port = port  # 0: any free port, fixed on the first start so a restart reuses it
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        """Start serving (again): moto keeps its buckets in process memory, so a restart finds them all."""
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        # stop() only ends the serving loop; closing the listening socket makes the port refuse connections,
        # as a dead endpoint does, and frees it for a restart
        werkzeug_server: Any = self._server._server
        werkzeug_server.server_close()
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, **overrides: Any) -> StorageSettings:
        values: dict[str, Any] = {"endpoint_url": self.endpoint, "region": "us-east-1", "access_key_id": "testing",
                                  "secret_access_key": "testing", "max_attempts": 2, "connect_timeout": 2.0,
                                  "read_timeout": 10.0}
        return StorageSettings(**(values | overrides))

    def create_bucket(self) -> None:
        from elite.data.storage import S3Store

        S3Store(self.bucket, "", self.settings()).client.create_bucket(Bucket=self.bucket)

    def seed(self, objects: Iterable[tuple[str, bytes]]) -> None:
        """Write objects straight into moto's in-process backend: 1,000 PUTs over HTTP take ~7 s, this 20 ms.
        Only for setting up what a test then reads over HTTP."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key, value in objects:
            backend.put_object(self.bucket, key, value)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    """A running moto S3 server with the bucket `BUCKET`; tests keep apart by key prefix. A test may stop and
    start it (same port, same objects) but must leave it running."""
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = MotoS3()
    server.start()
    try:
        server.create_bucket()
        yield server
    finally:
        server.stop()
        werkzeug_log.setLevel(level)
