"""Object storage: one small interface over local folders and S3 (AWS, MinIO or any S3 endpoint).

    open_store("embeddings/")                  LocalStore, the embedded default (also file:///abs/path)
    open_store("s3://bucket/prefix")           S3Store through boto3
    embedding_store(uri)                       an EmbeddingStore on either (elite.store)

Both backends take the same '/'-separated relative keys and refuse the same bad ones ('..', absolute,
backslashes, control characters), so data moves between them unchanged and no key escapes a local root.
A put is all-or-nothing on both: locally a dot-prefixed temporary file is fsynced and renamed over the
key; on S3 a single PUT or a multipart upload only becomes visible when it completes. Transient S3
errors (throttling, 5xx, dropped connections) are retried by botocore's retry handler, configured from
`StorageSettings`; everything else surfaces as a `StorageError` naming the URI. Guide: docs/storage.md.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import hashlib
import io
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Protocol
from urllib.parse import unquote

import boto3
import pyarrow as pa
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from elite.errors import InputError, StorageError
from elite.fileio import atomic_path, sha256_file
from elite.store import DEFAULT_ROW_GROUP_ROWS, EmbeddingStore, LocalFolder, is_part_name

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "ObjectStorePartStorage",
    "S3Store",
    "StorageSettings",
    "embedding_store",
    "open_store",
    "storage_settings_from_env",
]

MiB = 1024 * 1024
SHA256_METADATA = "sha256"  # sent as x-amz-meta-sha256 with every S3 put
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # elite.fileio.atomic_path's in-progress files
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters, and '\\' (a separator on Windows)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")  # lenient: legacy us-east-1 names allow more than today


# ---- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageSettings:
    """How to reach S3. None leaves a value to boto3's standard chain (environment, ~/.aws, instance role).

    Built by `storage_settings_from_env`; credentials are left out of repr so they never reach a log.
    """

    endpoint_url: str | None = None  # None: AWS (or AWS_ENDPOINT_URL[_S3], which botocore reads itself)
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / the profile's region
    profile: str | None = None  # None: AWS_PROFILE or the default profile
    access_key_id: str | None = field(default=None, repr=False)  # None: the AWS credential chain
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    addressing_style: str = "auto"  # botocore's default; "path" for MinIO and most self-hosted endpoints
    max_attempts: int = 5  # tries per request, the first included; botocore's 3 is short for batch jobs
    retry_mode: str = "standard"  # botocore: backoff with jitter on throttling, 5xx and connection errors
    connect_timeout: float = 10.0  # seconds; botocore's 60 s default makes a dead endpoint take minutes
    read_timeout: float = 60.0  # seconds; botocore's default
    multipart_threshold: int = 8 * MiB  # boto3 TransferConfig default: objects from this size upload in parts
    multipart_chunksize: int = 8 * MiB  # boto3 TransferConfig default; S3 parts are at least 5 MiB
    max_concurrency: int = 10  # boto3 TransferConfig default: parts in flight at once
    list_page_size: int = 1000  # keys per ListObjectsV2 request; 1000 is S3's maximum
    # the least one ranged GET fetches when an object is read piecewise: Parquet footers and key-column chunks are
    # small (pyarrow reads footers in 64 KiB too); a larger read goes out as one GET of its own size
    read_block_size: int = 64 * 1024

    def __post_init__(self) -> None:
        choices = {"addressing_style": ("auto", "path", "virtual"), "retry_mode": ("standard", "adaptive", "legacy")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _bad_setting(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        minimum = {"max_attempts": 1, "multipart_threshold": 1, "max_concurrency": 1, "list_page_size": 1,
                   "read_block_size": 1, "multipart_chunksize": 5 * MiB, "connect_timeout": 0.001,
                   "read_timeout": 0.001}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                _bad_setting(name, f"must be at least {low}, got {getattr(self, name)}")
        if self.list_page_size > 1000:
            _bad_setting("list_page_size", f"must be at most 1000 (S3's page limit), got {self.list_page_size}")
        if self.multipart_chunksize > 5 * 1024 * MiB:
            _bad_setting("multipart_chunksize", "must be at most 5 GiB (S3's part limit)")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            _bad_setting("endpoint_url", f"must start with http:// or https://, got {self.endpoint_url!r}")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            _bad_setting("access_key_id", "and secret_access_key must be given together (or both left to the "
                         "AWS credential chain)")
        if self.session_token is not None and self.access_key_id is None:
            _bad_setting("session_token", "needs access_key_id and secret_access_key")


def _env_names(name: str) -> tuple[str, ...]:
    """The variables a setting is read from, ours first. AWS's own are read here only where passing the
    setting explicitly would otherwise hide them from botocore."""
    aws = {"max_attempts": ("AWS_MAX_ATTEMPTS",), "retry_mode": ("AWS_RETRY_MODE",)}
    return (f"ELITE_S3_{name.upper()}", *aws.get(name, ()))


def _bad_setting(name: str, why: str) -> NoReturn:
    raise InputError(f"storage setting {name} ({_env_names(name)[0]}) {why}")


def storage_settings_from_env(environ: Mapping[str, str] | None = None) -> StorageSettings:
    """Settings from ELITE_S3_* variables (AWS_MAX_ATTEMPTS / AWS_RETRY_MODE as fallbacks); the rest is
    left to boto3's chain. Called when a store is opened, never at import time."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in dataclasses.fields(StorageSettings):
        found = [(var, environ[var]) for var in _env_names(setting.name) if environ.get(var, "") != ""]
        if not found:
            continue
        var, raw = found[0]
        default: Any = setting.default  # every field has a default; its type says how to parse the text
        kind = str if default is None else type(default)
        try:
            values[setting.name] = kind(raw)
        except ValueError:
            raise InputError(f"{var}={raw!r}: not a valid {kind.__name__}") from None
    return StorageSettings(**values)


# ---- the interface -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root, '/'-separated
    size: int  # bytes
    etag: str | None  # S3's ETag without quotes ("<md5>-<parts>" after a multipart upload); None locally
    last_modified: datetime.datetime | None  # UTC


class ObjectStore(Protocol):
    """A flat namespace of immutable-by-convention objects under one root (a folder or an S3 prefix)."""

    def uri(self, key: str = "") -> str:
        """The root's URI, or a key's: file:///... or s3://bucket/prefix/key."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, at any depth, sorted by key; fetched page by page."""
        ...

    def get(self, key: str) -> bytes:
        ...

    def open(self, key: str) -> BinaryIO:
        """A seekable read-only file over the object, read piece by piece (S3: ranged GETs)."""
        ...

    def put(self, key: str, data: bytes | str | os.PathLike[str]) -> None:
        """Store bytes, or a local file's contents, under `key`: readers see the old object or the whole new one."""
        ...

    def exists(self, key: str) -> bool:
        ...

    def sha256(self, key: str) -> str:
        """Hex sha256 of the object's bytes."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""
        ...


def check_key(key: str) -> str:
    """`key` if it is a clean relative '/'-path, else InputError. Applied by both backends alike."""
    if not isinstance(key, str) or not key:
        raise InputError(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise InputError(f"object key {key!r} is absolute; keys are relative to the store's root")
    if _BAD_KEY_CHARS.search(key):
        raise InputError(f"object key {key!r} holds a backslash or a control character")
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise InputError(f"object key {key!r} has an empty, '.' or '..' segment; keys may not leave the root")
    if _TEMP_NAME.fullmatch(segments[-1]):
        raise InputError(f"object key {key!r} looks like an in-progress write (.<name>.<8 hex>.tmp); such "
                         "names are reserved and never listed")
    return key


def _check_prefix(prefix: str) -> str:
    """A listing prefix: a key, a folder ending in '/', a partial name, or '' for everything."""
    if prefix:
        check_key(prefix.rstrip("/") + "/x" if prefix.endswith("/") else prefix)
    return prefix


def _source_file(data: str | os.PathLike[str], target: str) -> Path:
    source = Path(data)
    if not source.is_file():
        raise InputError(f"{source}: not a file, cannot put it as {target}")
    return source


# ---- local folders -------------------------------------------------------------------------------

class LocalStore:
    """Objects as files under a folder; the folder is made by the first put."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self._real_root = self.root.resolve()  # once: resolving is a syscall per path component

    def uri(self, key: str = "") -> str:
        return (self.root / check_key(key) if key else self.root).as_uri()  # names only: no link check needed

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # a symlink inside the root could still lead out of it; resolve() follows links (strict=False: the
        # file need not exist yet)
        if not path.resolve().is_relative_to(self._real_root):
            raise InputError(f"object key {key!r} leads out of {self.root} through a symbolic link")
        return path

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = self.root / _check_prefix(prefix).rpartition("/")[0]  # walk only the prefix's folder

        def fail(err: OSError) -> None:
            if not isinstance(err, FileNotFoundError):  # a folder deleted mid-walk is simply empty
                raise StorageError(f"{self.uri()}: cannot list {err.filename}: {err.strerror}") from err

        found: builtins.list[ObjectInfo] = []
        for folder, _, names in os.walk(start, onerror=fail):
            for name in names:
                path = Path(folder, name)
                key = path.relative_to(self.root).as_posix()
                if _TEMP_NAME.fullmatch(name) or not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted since the walk saw it
                    continue
                modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.UTC)
                found.append(ObjectInfo(key, stat.st_size, None, modified))
        # str order is code point order, which is UTF-8 byte order: the order S3 lists in
        yield from sorted(found, key=lambda info: info.key)

    def get(self, key: str) -> bytes:
        with self._errors(key, "read"):
            return self._path(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        with self._errors(key, "open"):
            return open(self._path(key), "rb")  # the caller closes it

    def put(self, key: str, data: bytes | str | os.PathLike[str]) -> None:
        path = self._path(key)
        if isinstance(data, bytes | bytearray | memoryview):
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        else:
            source = _source_file(data, self.uri(key))
            with atomic_path(path) as tmp:
                shutil.copyfile(source, tmp)
        with self._errors(key, "write"):  # make the rename itself durable, not only the bytes
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def sha256(self, key: str) -> str:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"{self.uri(key)}: not found")
        return sha256_file(path)

    def delete(self, key: str) -> None:
        with self._errors(key, "delete"):
            self._path(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _errors(self, key: str, doing: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, NotADirectoryError) as err:
            raise StorageError(f"{self.uri(key)}: not found") from err
        except IsADirectoryError as err:
            raise StorageError(f"{self.uri(key)}: is a folder, not an object") from err
        except OSError as err:
            raise StorageError(f"{self.uri(key)}: {doing} failed: {err.strerror or err}") from err


# ---- S3 ------------------------------------------------------------------------------------------

class S3Store:
    """Objects under `s3://bucket/prefix/` through one boto3 client (thread-safe; share the store freely)."""

    def __init__(self, bucket: str, prefix: str = "", settings: StorageSettings | None = None) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise InputError(f"s3://{bucket}: not a valid bucket name")
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.settings = s = storage_settings_from_env() if settings is None else settings
        self._transfer = TransferConfig(multipart_threshold=s.multipart_threshold,
                                        multipart_chunksize=s.multipart_chunksize, max_concurrency=s.max_concurrency)
        self.endpoint = s.endpoint_url or "AWS"  # for messages until the client has resolved the real URL
        self.client = self._make_client()
        self.endpoint = str(self.client.meta.endpoint_url)

    def _make_client(self) -> Any:
        s = self.settings
        config = Config(
            retries={"total_max_attempts": s.max_attempts, "mode": s.retry_mode},  # total: the first try included
            connect_timeout=s.connect_timeout, read_timeout=s.read_timeout,
            s3={"addressing_style": s.addressing_style},
            max_pool_connections=max(10, s.max_concurrency),  # one connection per part in flight
        )
        with self._errors("", "connect"):  # a missing profile fails here
            session = boto3.session.Session(aws_access_key_id=s.access_key_id,
                                            aws_secret_access_key=s.secret_access_key,
                                            aws_session_token=s.session_token, region_name=s.region,
                                            profile_name=s.profile)
            return session.client("s3", endpoint_url=s.endpoint_url, config=config)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key) if key else self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""  # the '/' keeps s3://b/data from listing s3://b/data2
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=root + _check_prefix(prefix),
                                   PaginationConfig={"PageSize": self.settings.list_page_size})
        with self._errors(prefix, "list"):
            for page in pages:  # each page is one request, fetched as the caller consumes the previous one
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/"):  # a console-made "folder" marker, not an object
                        continue
                    modified = item["LastModified"].astimezone(datetime.UTC)
                    yield ObjectInfo(item["Key"][len(root):], int(item["Size"]), item["ETag"].strip('"'), modified)

    def get(self, key: str) -> bytes:
        with self._errors(key, "read"):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return bytes(body.read())

    def open(self, key: str) -> BinaryIO:
        with self._errors(key, "open"):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        raw = _RangeReader(self, key, int(head["ContentLength"]), head["ETag"])
        return io.BufferedReader(raw, buffer_size=self.settings.read_block_size)

    def put(self, key: str, data: bytes | str | os.PathLike[str]) -> None:
        """One PUT below multipart_threshold, else a multipart upload that S3 publishes only on completion
        (s3transfer aborts it on failure). The sha256 goes along as metadata, so `sha256` needs no download."""
        target = self._key(key)
        opener: Callable[[], BinaryIO]
        if isinstance(data, bytes | bytearray | memoryview):
            digest, opener = hashlib.sha256(data).hexdigest(), lambda: io.BytesIO(data)
        else:
            source = _source_file(data, self.uri(key))
            digest, opener = sha256_file(source), lambda: open(source, "rb")
        # upload_fileobj, not upload_file: upload_file replaces the ClientError (and its code) by a message
        with self._errors(key, "write"), opener() as handle:
            self.client.upload_fileobj(handle, self.bucket, target, Config=self._transfer,
                                        ExtraArgs={"Metadata": {SHA256_METADATA: digest}})

    def exists(self, key: str) -> bool:
        with self._errors(key, "check"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                # HEAD has no body, so a missing object reads as a bare 404 (as a missing bucket does too)
                if _error_code(err) in ("404", "NoSuchKey"):
                    return False
                raise
        return True

    def sha256(self, key: str) -> str:
        with self._errors(key, "hash"):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            stored = head.get("Metadata", {}).get(SHA256_METADATA, "")
            if _SHA256.fullmatch(stored):  # written by `put`, in the same request as the bytes it describes
                return str(stored)
            # written by another tool: hash it while streaming, pinned to the version the HEAD saw
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), IfMatch=head["ETag"])["Body"]
            digest = hashlib.sha256()
            for chunk in body.iter_chunks(MiB):
                digest.update(chunk)
            return digest.hexdigest()

    def delete(self, key: str) -> None:
        with self._errors(key, "delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def read_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes [start, end) of the object, failing if it no longer has `etag` (it was replaced)."""
        with self._errors(key, "read"):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                               Range=f"bytes={start}-{end - 1}", IfMatch=etag)
            return bytes(response["Body"].read())

    @contextlib.contextmanager
    def _errors(self, key: str, doing: str) -> Iterator[None]:
        """Turn boto3's and botocore's errors into a StorageError naming the URI and the reason."""
        try:
            yield
        except ClientError as err:
            raise StorageError(self._client_error_message(key, doing, err)) from err
        except (BotoCoreError, Boto3Error) as err:
            raise StorageError(self._botocore_error_message(key, doing, err)) from err

    def _client_error_message(self, key: str, doing: str, err: ClientError) -> str:
        uri, code = self.uri(key), _error_code(err)
        if code in ("NoSuchKey", "404"):
            return f"{uri}: not found"
        if code == "NoSuchBucket":
            return f"{uri}: bucket {self.bucket!r} does not exist at {self.endpoint}"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return f"{uri}: access denied ({code}) at {self.endpoint}: check the credentials and the bucket's policy"
        if code in ("PreconditionFailed", "412"):
            return f"{uri}: the object was replaced while being read; read it again"
        return f"{uri}: {doing} failed: {err}"

    def _botocore_error_message(self, key: str, doing: str, err: Exception) -> str:
        uri = self.uri(key)
        if isinstance(err, BotoConnectionError):  # refused, DNS, TLS, connect timeout: botocore retried these
            return (f"{uri}: cannot reach the S3 endpoint {self.endpoint} "
                    f"(gave up after {self.settings.max_attempts} attempts): {err}")
        if isinstance(err, NoCredentialsError):
            return (f"{uri}: no S3 credentials found; set ELITE_S3_ACCESS_KEY_ID and ELITE_S3_SECRET_ACCESS_KEY, "
                    "the AWS_* variables, a profile, or run with an instance role")
        return f"{uri}: {doing} failed: {err}"


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class _RangeReader(io.RawIOBase):
    """A seekable raw file over an S3 object: each read is one ranged GET (io.BufferedReader adds read-ahead)."""

    def __init__(self, store: S3Store, key: str, size: int, etag: str) -> None:
        self.store, self.key, self.size, self.etag = store, key, size, etag
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.position + len(view), self.size)
        if end <= self.position:
            return 0  # at or past the end: S3 would answer 416 to an empty range
        data = self.store.read_range(self.key, self.position, end, self.etag)
        view[:len(data)] = data
        self.position += len(data)
        return len(data)


# ---- opening stores ------------------------------------------------------------------------------

def open_store(uri: str | os.PathLike[str], settings: StorageSettings | None = None) -> LocalStore | S3Store:
    """A plain path or file:// URL -> LocalStore; s3://bucket[/prefix] -> S3Store; any other scheme -> InputError.

    `settings` apply to S3 only; None reads them from the environment (`storage_settings_from_env`).
    """
    text = os.fspath(uri)
    match = _SCHEME.match(text)
    if match is None:
        if not text:
            raise InputError("storage location is empty; give a folder, file:///path or s3://bucket/prefix")
        return LocalStore(text)
    scheme, rest = match.group(1).lower(), text[match.end():]
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InputError(f"{text}: no bucket; expected s3://bucket/prefix")
        return S3Store(bucket, prefix, settings)
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise InputError(f"{text}: file URLs must be file:///absolute/path (no host)")
        return LocalStore(unquote("/" + path))
    raise InputError(f"{text}: unsupported storage scheme {scheme!r}; use a folder, file:///path or s3://bucket/prefix")


def is_uri(text: str) -> bool:
    """True for `scheme://...` (s3://, file://), false for plain paths and store keys."""
    return _SCHEME.match(text) is not None


def open_object(uri: str, settings: StorageSettings | None = None) -> tuple[LocalStore | S3Store, str]:
    """(store of the containing folder, key) for the URI or path of one object, e.g. a prompt file."""
    folder, name = posixpath.split(uri.rstrip("/"))
    if not name:
        raise InputError(f"{uri!r} names a folder, not an object")
    return open_store(folder, settings), name


class ObjectStorePartStorage:
    """elite.store's `PartStorage` on any ObjectStore: parts are objects directly under the store's root (list_parts
    lists the whole root, so give the embedding store a prefix of its own).

    A part is written to a local temporary file first, then put in one go, so it appears whole or not at all
    (on S3 as a single PUT or a multipart upload completed only after every part arrived).
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def list_parts(self) -> list[str]:
        return sorted(info.key for info in self.store.list() if "/" not in info.key and is_part_name(info.key))

    def open_part(self, name: str) -> Any:
        # PythonFile: pyarrow seeks and reads through it, so a Parquet read fetches the footer and the row groups
        # it needs, not the whole part
        return pa.PythonFile(self.store.open(name), mode="r")

    def write_part(self, name: str, write: Callable[[Any], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="elite-part-") as folder:
            path = Path(folder, "part.parquet")
            with pa.OSFile(str(path), "wb") as sink:
                write(sink)
            self.store.put(name, path)

    def uri(self, name: str = "") -> str:
        return self.store.uri(name)


def embedding_store(uri: str | os.PathLike[str], settings: StorageSettings | None = None, *,
                    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> EmbeddingStore:
    """An EmbeddingStore at a folder, file:// URL or s3://bucket/prefix."""
    store = open_store(uri, settings)
    if isinstance(store, LocalStore):
        # LocalFolder, not the generic adapter: it memory-maps parts and writes them in place
        return EmbeddingStore(LocalFolder(store.root), row_group_rows=row_group_rows)
    return EmbeddingStore(ObjectStorePartStorage(store), row_group_rows=row_group_rows)
