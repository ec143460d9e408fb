"""elite.data.storage: the same behaviour suite on a local folder and on a real (moto) S3 server."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from botocore.exceptions import EndpointConnectionError

from elite.data.part_index import LocalFolder
from elite.data.storage import (
    LocalStore,
    ObjectStore,
    ObjectStorePartStorage,
    S3Store,
    StorageSettings,
    embedding_store,
    open_store,
    storage_settings_from_env,
)
from elite.data.store import EmbeddingStore
from elite.data.store_format import EmbeddingRecord
from elite.errors import InputError, StorageError

if TYPE_CHECKING:
    from s3_server import MotoS3  # only for types: see s3_server's docstring

pytest_plugins = ["s3_server"]

MiB = 1024 * 1024


def fresh_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"  # tests share one bucket and stay apart by prefix


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: MotoS3 = request.getfixturevalue("s3_server")  # started only when an S3 case runs
    return S3Store(server.bucket, fresh_prefix(), server.settings())


def count_requests(store: S3Store, operation: str) -> list[int]:
    """Every HTTP attempt of `operation` appends to the returned list (retries included)."""
    attempts: list[int] = []
    store.client.meta.events.register(f"before-send.s3.{operation}", lambda **_: attempts.append(1))
    return attempts


def seed(request: pytest.FixtureRequest, store: ObjectStore, objects: list[tuple[str, bytes]]) -> None:
    """Set up many objects quickly, outside the API under test."""
    if isinstance(store, LocalStore):
        for key, data in objects:
            (store.root / key).parent.mkdir(parents=True, exist_ok=True)
            (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        request.getfixturevalue("s3_server").seed([(f"{store.prefix}/{key}", data) for key, data in objects])


# ---- the shared behaviour -------------------------------------------------------------------------

def test_put_get_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    store.put("images/1.jpg", b"first")
    store.put("images/1.jpg", b"second, longer")  # replaces
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 10)
    store.put("images/sub/2.bin", source)
    assert store.get("images/1.jpg") == b"second, longer"
    assert store.get("images/sub/2.bin") == source.read_bytes()
    infos = list(store.list())
    assert [(i.key, i.size) for i in infos] == [("images/1.jpg", 14), ("images/sub/2.bin", 2560)]
    assert all(i.last_modified is not None and i.last_modified.utcoffset() is not None for i in infos)
    assert store.uri("images/1.jpg").endswith("/images/1.jpg")
    with store.open("images/sub/2.bin") as handle:  # seekable, read piecewise
        handle.seek(-3, os.SEEK_END)
        assert handle.read() == source.read_bytes()[-3:]
        handle.seek(256)
        assert handle.read(4) == bytes([0, 1, 2, 3])


def test_listing_pages_through_more_than_1000_keys(request: pytest.FixtureRequest, store: ObjectStore) -> None:
    keys = [f"many/{n:05d}.txt" for n in range(1001)]  # S3 returns at most 1000 keys per page
    seed(request, store, [(key, b"x") for key in reversed(keys)] + [("other/a.txt", b"y"), ("many-not/b.txt", b"z")])
    requests = count_requests(store, "ListObjectsV2") if isinstance(store, S3Store) else None
    assert [info.key for info in store.list("many/")] == keys  # sorted, complete, only the prefix
    assert [info.key for info in store.list("many")][-1] == "many/01000.txt"  # a partial name is a prefix too
    assert len(list(store.list())) == 1003
    if requests is not None:
        assert len(requests) == 2 + 2 + 2  # two pages per listing of more than 1000 keys


def test_sha256_exists_and_delete(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    store.put("a/blob", data)
    source = tmp_path / "file"
    source.write_bytes(data[:999])
    store.put("a/file", source)
    assert store.sha256("a/blob") == hashlib.sha256(data).hexdigest()
    assert store.sha256("a/file") == hashlib.sha256(data[:999]).hexdigest()
    assert store.exists("a/blob") and not store.exists("a/missing") and not store.exists("a")
    store.delete("a/blob")
    store.delete("a/blob")  # deleting what is gone is fine
    assert not store.exists("a/blob")
    assert [info.key for info in store.list()] == ["a/file"]


def test_missing_objects_are_clear_errors(store: ObjectStore) -> None:
    for read in (store.get, store.sha256, store.open):
        with pytest.raises(StorageError, match=r"/nothing/here\.txt: not found"):
            read("nothing/here.txt")
    with pytest.raises(InputError, match="no-such-file"):
        store.put("k", "/no-such-file")
    assert list(store.list("nothing/")) == []


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/etc/passwd", "a\\..\\b", "a\x00b", "", "a//b",
                                 "a/", ".", "a/./b", ".x.0123abcd.tmp"])
def test_keys_that_could_leave_the_root_are_refused(store: ObjectStore, key: str, tmp_path: Path) -> None:
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                 lambda: store.delete(key)):
        with pytest.raises(InputError) as caught:
            call()
        assert repr(key) in str(caught.value)
    assert list(tmp_path.parent.glob("escape*")) == [] and list(store.list()) == []


# ---- local folders -------------------------------------------------------------------------------

def test_local_put_is_atomic(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b.bin", b"old")
    (tmp_path / "a" / ".c.bin.0123abcd.tmp").write_bytes(b"half")  # what a writer killed mid-put leaves
    assert [info.key for info in store.list()] == ["a/b.bin"]  # never listed
    (tmp_path / "a" / "dir").mkdir()
    with pytest.raises(StorageError, match="write failed"):  # the final rename fails: nothing replaced
        store.put("a/dir", b"new")
    store.put("a/b.bin", b"new")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".c.bin.0123abcd.tmp", "b.bin", "dir"]
    assert store.get("a/b.bin") == b"new"


def test_local_put_never_shows_a_partial_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    big_a, big_b = b"a" * (32 * MiB), b"b" * (32 * MiB)
    store.put("big", big_a)
    seen: set[int] = set()
    stop = threading.Event()

    def read_while_writing() -> None:
        while not stop.is_set():
            data = store.get("big")
            seen.add(len(data))
            assert data in (big_a, big_b)

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    for data in (big_b, big_a, big_b):
        store.put("big", data)
    stop.set()
    reader.join()
    assert seen == {32 * MiB}


def test_local_symlinks_out_of_the_root_are_refused(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InputError, match="symbolic link"):
        LocalStore(tmp_path / "root").put("link/x", b"x")
    assert list((tmp_path / "outside").iterdir()) == []


def test_open_store_picks_the_backend(tmp_path: Path, s3_server: MotoS3) -> None:
    spaced = tmp_path / "with space"
    assert isinstance(open_store(spaced), LocalStore)
    local = open_store(f"file://{spaced}")
    assert isinstance(local, LocalStore) and local.root == spaced
    reopened = open_store(local.uri())  # a file URL with %20
    assert isinstance(reopened, LocalStore) and reopened.root == spaced
    s3 = open_store("s3://elite-test/some/prefix/", s3_server.settings())
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("elite-test", "some/prefix")
    assert s3.uri() == "s3://elite-test/some/prefix" and s3.uri("k") == "s3://elite-test/some/prefix/k"
    for bad, message in [("gs://bucket/x", "unsupported storage scheme 'gs'"), ("s3:///x", "no bucket"),
                         ("file://host/x", "no host"), ("s3://bucket/../x", "'..'"), ("", "empty")]:
        with pytest.raises(InputError, match=message):
            open_store(bad, s3_server.settings())


# ---- S3 ------------------------------------------------------------------------------------------

def test_s3_small_pages_and_sha256_metadata(request: pytest.FixtureRequest, s3_server: MotoS3) -> None:
    store = S3Store(s3_server.bucket, fresh_prefix(), s3_server.settings(list_page_size=7))
    seed(request, store, [(f"k{n:02d}", b"x") for n in range(25)])  # written by "another tool": no sha256 metadata
    requests = count_requests(store, "ListObjectsV2")
    assert len(list(store.list())) == 25 and len(requests) == 4  # 7 + 7 + 7 + 4
    assert store.sha256("k00") == hashlib.sha256(b"x").hexdigest()  # streamed, as no metadata is there
    store.put("mine", b"y")
    head = store.client.head_object(Bucket=s3_server.bucket, Key=f"{store.prefix}/mine")
    assert head["Metadata"] == {"sha256": hashlib.sha256(b"y").hexdigest()}
    gets = count_requests(store, "GetObject")
    assert store.sha256("mine") == hashlib.sha256(b"y").hexdigest() and gets == []  # from metadata alone


def test_s3_large_objects_upload_in_parts(s3_server: MotoS3, tmp_path: Path) -> None:
    store = S3Store(s3_server.bucket, fresh_prefix(), s3_server.settings(multipart_threshold=1 * MiB,
                                                               multipart_chunksize=5 * MiB))
    data = os.urandom(11 * MiB + 3)  # parts of 5, 5 and 1 MiB + 3 bytes
    parts = count_requests(store, "UploadPart")
    store.put("big.bin", data)
    assert len(parts) == 3
    head = store.client.head_object(Bucket=s3_server.bucket, Key=f"{store.prefix}/big.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")  # a multipart object
    assert store.get("big.bin") == data
    assert store.sha256("big.bin") == hashlib.sha256(data).hexdigest()
    source = tmp_path / "big.bin"
    source.write_bytes(data[: 6 * MiB])
    store.put("from-file.bin", source)
    assert len(parts) == 5 and store.get("from-file.bin") == data[: 6 * MiB]
    small = count_requests(store, "PutObject")
    store.put("small.bin", data[: MiB - 1])  # below the threshold: one PUT
    assert len(small) == 1 and len(parts) == 5


def test_s3_failed_multipart_upload_leaves_the_old_object(s3_server: MotoS3) -> None:
    store = S3Store(s3_server.bucket, fresh_prefix(), s3_server.settings(multipart_threshold=1 * MiB,
                                                               multipart_chunksize=5 * MiB, max_concurrency=1))
    store.put("obj", b"old")
    parts: list[int] = []

    def fail_second_part(**_: Any) -> None:
        parts.append(1)
        if len(parts) == 2:
            raise EndpointConnectionError(endpoint_url=store.endpoint)  # the connection died mid-upload

    store.client.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        store.put("obj", os.urandom(11 * MiB))
    assert store.get("obj") == b"old"  # the half-uploaded object never became visible
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    assert uploads.get("Uploads", []) == []  # and the upload was aborted, not left to cost storage


def test_s3_missing_bucket_is_a_clear_error(s3_server: MotoS3) -> None:
    store = open_store("s3://no-such-bucket/x", s3_server.settings())
    for call in (lambda: store.get("k"), lambda: list(store.list()), lambda: store.put("k", b"x")):
        with pytest.raises(StorageError, match=r"s3://no-such-bucket/x.*bucket 'no-such-bucket' does not exist"):
            call()


def test_s3_retries_then_fails_clearly_then_recovers(s3_server: MotoS3) -> None:
    store = S3Store(s3_server.bucket, fresh_prefix(), s3_server.settings(max_attempts=3, connect_timeout=1.0))
    store.put("k", b"value")
    s3_server.stop()  # the endpoint is gone: connections are refused
    try:
        attempts = count_requests(store, "GetObject")
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"cannot reach the S3 endpoint .* after 3 attempts"):
            store.get("k")
        assert len(attempts) == 3  # botocore's retry handler tried three times with backoff (at most 1 + 2 s)
        assert time.monotonic() - start < 10
    finally:
        s3_server.start()  # same port, same objects
    assert store.get("k") == b"value"  # the same client recovers


def test_s3_reader_notices_a_replaced_object(s3_server: MotoS3) -> None:
    store = S3Store(s3_server.bucket, fresh_prefix(), s3_server.settings(read_block_size=1024))
    store.put("k", b"a" * 4096)
    with store.open("k") as handle:
        assert handle.read(10) == b"a" * 10
        store.put("k", b"b" * 4096)
        with pytest.raises(StorageError, match="replaced while being read"):
            handle.read()


# ---- settings --------------------------------------------------------------------------------------

def test_settings_from_env_and_validation() -> None:
    env = {"ELITE_S3_ENDPOINT_URL": "http://minio:9000", "ELITE_S3_REGION": "eu-west-1",
           "ELITE_S3_ACCESS_KEY_ID": "AKIDEXAMPLE", "ELITE_S3_SECRET_ACCESS_KEY": "s3cr3t-value",
           "ELITE_S3_ADDRESSING_STYLE": "path", "AWS_MAX_ATTEMPTS": "7", "AWS_RETRY_MODE": "adaptive",
           "ELITE_S3_RETRY_MODE": "standard", "ELITE_S3_MULTIPART_THRESHOLD": str(100 * MiB),
           "ELITE_S3_READ_TIMEOUT": "2.5", "ELITE_S3_SESSION_TOKEN": ""}
    settings = storage_settings_from_env(env)
    assert settings == StorageSettings(endpoint_url="http://minio:9000", region="eu-west-1",
                                       access_key_id="AKIDEXAMPLE", secret_access_key="s3cr3t-value",
                                       addressing_style="path", max_attempts=7, retry_mode="standard",
                                       multipart_threshold=100 * MiB, read_timeout=2.5)
    assert "s3cr3t" not in repr(settings) and "AKID" not in repr(settings)
    assert storage_settings_from_env({}) == StorageSettings()  # all else from boto3's chain
    bad = [({"ELITE_S3_MAX_ATTEMPTS": "many"}, r"ELITE_S3_MAX_ATTEMPTS='many': not a valid int"),
           ({"ELITE_S3_MAX_ATTEMPTS": "0"}, r"max_attempts \(ELITE_S3_MAX_ATTEMPTS\) must be at least 1"),
           ({"ELITE_S3_RETRY_MODE": "forever"}, "retry_mode .* must be one of"),
           ({"ELITE_S3_MULTIPART_CHUNKSIZE": "1024"}, "multipart_chunksize .* at least 5242880"),
           ({"ELITE_S3_ENDPOINT_URL": "minio:9000"}, "must start with http"),
           ({"ELITE_S3_ACCESS_KEY_ID": "AKID"}, "given together")]
    for environ, message in bad:
        with pytest.raises(InputError, match=message):
            storage_settings_from_env(environ)


def test_s3_client_carries_the_retry_and_timeout_settings(s3_server: MotoS3) -> None:
    settings = s3_server.settings(max_attempts=4, retry_mode="adaptive", connect_timeout=3.0, addressing_style="path")
    store = S3Store(s3_server.bucket, "x", settings)
    config = store.client.meta.config
    assert config.retries == {"total_max_attempts": 4, "mode": "adaptive"}
    assert (config.connect_timeout, config.s3["addressing_style"]) == (3.0, "path")


# ---- the embedding store on object storage ---------------------------------------------------------

def make_record(n: int, text_dim: int = 32, grid: int = 4) -> EmbeddingRecord:
    rng = np.random.default_rng(n)
    mask_grid = (rng.random((grid, grid)) > 0.5).astype(np.float32)  # (grid, grid)
    local_tokens = rng.standard_normal((grid * grid, text_dim), dtype=np.float32)  # (patches, text_dim)
    return EmbeddingRecord(
        concept_id=f"concept-{n:03d}", source_uri=f"s3://catalog/{n}.jpg",
        image_sha256=hashlib.sha256(f"image {n}".encode()).hexdigest(), mask_sha256=None, encoder_id="enc-a",
        words=rng.standard_normal((5, text_dim), dtype=np.float32),
        local_tokens=local_tokens * mask_grid.reshape(-1, 1), mask_grid=mask_grid, metadata={"sku": f"SKU-{n}"})


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, StorageSettings | None]:
    if request.param == "local":
        return str(tmp_path / "embeddings"), None
    server: MotoS3 = request.getfixturevalue("s3_server")
    return f"s3://{server.bucket}/{fresh_prefix()}/embeddings", server.settings()


def test_embedding_store_round_trip(store_uri: tuple[str, StorageSettings | None]) -> None:
    uri, settings = store_uri
    store = embedding_store(uri, settings, row_group_rows=3)
    expected_storage = LocalFolder if settings is None else ObjectStorePartStorage
    assert isinstance(store.storage, expected_storage)
    records = [make_record(n) for n in range(8)]
    first = store.append(records[:5])
    again = store.append(records)  # five already stored
    assert (first.written, again.written, again.skipped) == (5, 3, 5)
    open_store(uri, settings).put("notes/readme.txt", b"not a part")  # other objects under the root are ignored
    fresh = embedding_store(uri, settings)  # a second process sees the same table
    assert isinstance(fresh, EmbeddingStore)
    assert (first.version, again.version, fresh.version()) == (1, 2, 2)  # version 0 created the table
    assert len(fresh._listing()) == 2 and all(name.endswith(".parquet") for name in fresh._listing())
    arrays = fresh.read_arrays(["concept-006", "concept-001"])
    assert arrays.concept_ids == ["concept-006", "concept-001"]
    np.testing.assert_array_equal(arrays.words[0], records[6].words)
    np.testing.assert_array_equal(arrays.local_tokens[1], records[1].local_tokens)
    assert arrays.metadata == {"sku": ["SKU-6", "SKU-1"]}
    assert len(fresh.read_arrays()) == 8


def test_embedding_store_on_s3_reads_only_what_it_needs(s3_server: MotoS3) -> None:
    uri = f"s3://{s3_server.bucket}/{fresh_prefix()}"
    store = embedding_store(uri, s3_server.settings(), row_group_rows=4)
    store.append([make_record(n, text_dim=768, grid=16) for n in range(24)])  # real size: 6 row groups, ~5 MB
    reader = embedding_store(uri, s3_server.settings())
    assert isinstance(reader, EmbeddingStore) and isinstance(reader.storage, ObjectStorePartStorage)
    objects = reader.storage.store
    (part,) = [info for info in objects.list() if info.key.endswith(".parquet")]
    fetched: list[int] = []
    objects.client.meta.events.register("after-call.s3.GetObject",
                                        lambda parsed, **_: fetched.append(int(parsed["ContentLength"])))
    assert reader.read_arrays(["concept-013"]).concept_ids == ["concept-013"]
    assert 0 < sum(fetched) < part.size / 2  # the footer, the key columns and one row group; not the whole part


def test_failed_part_write_leaves_no_object(s3_server: MotoS3) -> None:
    objects = S3Store(s3_server.bucket, fresh_prefix(), s3_server.settings())
    storage = ObjectStorePartStorage(objects)

    def write_then_fail(sink: Any) -> None:
        sink.write(b"PAR1 half a part")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_part("part-x.parquet", write_then_fail)
    assert list(objects.list()) == [] and storage.list_parts() == []
