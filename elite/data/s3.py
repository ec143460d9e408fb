"""S3 object storage (AWS, MinIO or any S3 endpoint) through boto3, and the settings that reach it.

Transient S3 errors (throttling, 5xx, dropped connections) are retried by botocore's retry handler, configured
from `StorageSettings`; what is still failing after those attempts surfaces as a `TransientStorageError`, everything
else (not found, access denied) as a `StorageError` naming the URI. Guide: docs/storage.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import mimetypes
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NoReturn

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from elite.data.objects import MiB, ObjectInfo, check_key, check_prefix, source_file
from elite.errors import InputError, StorageError, TransientStorageError, redact
from elite.fileio import sha256_file

SHA256_METADATA = "sha256"  # sent as x-amz-meta-sha256 with every S3 put
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")  # lenient: legacy us-east-1 names allow more than today


# ---- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class StorageSettings:
    """How to reach S3. None leaves a value to boto3's standard chain (environment, ~/.aws, instance role).

    Built by `storage_settings_from_env`; credentials are left out of repr (and a password in the endpoint URL
    is redacted there) so they never reach a log.
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
    # HTTP connections kept per client: at least the threads that share a store (the jobs hash and list with
    # elite.jobs.IO_THREADS = 16); botocore's 10 made 16 hashing threads log "Connection pool is full"
    max_pool_connections: int = 32
    list_page_size: int = 1000  # keys per ListObjectsV2 request; 1000 is S3's maximum
    # the least one ranged GET fetches when an object is read piecewise: Parquet footers and key-column chunks are
    # small (pyarrow reads footers in 64 KiB too); a larger read goes out as one GET of its own size
    read_block_size: int = 64 * 1024

    def __repr__(self) -> str:
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr]
        return redact(f"StorageSettings({', '.join(shown)})", self.secrets)

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self.access_key_id, self.secret_access_key, self.session_token)

    def __post_init__(self) -> None:
        choices = {"addressing_style": ("auto", "path", "virtual"), "retry_mode": ("standard", "adaptive", "legacy")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _bad_setting(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        minimum = {"max_attempts": 1, "multipart_threshold": 1, "max_concurrency": 1, "max_pool_connections": 1,
                   "list_page_size": 1, "read_block_size": 1, "multipart_chunksize": 5 * MiB, "connect_timeout": 0.001,
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
        self.endpoint = redact(s.endpoint_url or "AWS")  # for messages until the client has resolved the real URL
        self.client = self._make_client()
        self.endpoint = redact(str(self.client.meta.endpoint_url))

    def _make_client(self) -> Any:
        s = self.settings
        config = Config(
            retries={"total_max_attempts": s.max_attempts, "mode": s.retry_mode},  # total: the first try included
            connect_timeout=s.connect_timeout, read_timeout=s.read_timeout,
            s3={"addressing_style": s.addressing_style},
            max_pool_connections=max(s.max_pool_connections, s.max_concurrency),  # and one per part in flight
        )
        with self._errors("", "connect"):  # a missing profile fails here
            self._session = boto3.session.Session(aws_access_key_id=s.access_key_id,
                                                  aws_secret_access_key=s.secret_access_key,
                                                  aws_session_token=s.session_token, region_name=s.region,
                                                  profile_name=s.profile)
            return self._session.client("s3", endpoint_url=s.endpoint_url, config=config)

    def delta_storage_options(self) -> dict[str, str]:
        """The same endpoint, region, credentials and addressing as deltalake `storage_options` (object_store's
        names), for the embedding table. Commits use conditional PUTs (`If-None-Match: *`), which AWS S3, MinIO
        and R2 support, so no lock service is needed. Credentials given in the settings or by a profile are
        passed as they are now; otherwise object_store's own chain (environment, web identity, container and
        instance roles) finds and refreshes them."""
        s = self.settings
        options = {"aws_conditional_put": "etag", "aws_connect_timeout": f"{s.connect_timeout}s",
                   "aws_timeout": f"{s.read_timeout}s"}
        region = s.region or self._session.region_name
        if region:
            options["aws_region"] = region
        if s.endpoint_url is not None:
            options["aws_endpoint_url"] = s.endpoint_url
            options["aws_allow_http"] = str(s.endpoint_url.startswith("http://")).lower()
        if s.addressing_style != "auto" or s.endpoint_url is not None:  # botocore's auto: path style off AWS
            options["aws_virtual_hosted_style_request"] = str(s.addressing_style == "virtual").lower()
        if s.access_key_id is not None or s.profile is not None:
            with self._errors("", "connect"):
                found = self._session.get_credentials()
            if found is None:
                raise StorageError(f"{self.uri()}: no AWS credentials found for the embedding table")
            frozen = found.get_frozen_credentials()
            options.update({"aws_access_key_id": frozen.access_key, "aws_secret_access_key": frozen.secret_key})
            if frozen.token:
                options["aws_session_token"] = frozen.token
        return options

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key) if key else self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{check_key(key)}" if self.prefix else check_key(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""  # the '/' keeps s3://b/data from listing s3://b/data2
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=root + check_prefix(prefix),
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
            source = source_file(data, self.uri(key))
            digest, opener = sha256_file(source), lambda: open(source, "rb")
        extra: dict[str, Any] = {"Metadata": {SHA256_METADATA: digest}}
        content_type = mimetypes.guess_type(key)[0]
        if content_type:  # a report or an image opened from the bucket shows in the browser, not as a download
            extra["ContentType"] = content_type + ("; charset=utf-8" if content_type.startswith("text/") else "")
        # upload_fileobj, not upload_file: upload_file replaces the ClientError (and its code) by a message
        with self._errors(key, "write"), opener() as handle:
            self.client.upload_fileobj(handle, self.bucket, target, Config=self._transfer, ExtraArgs=extra)

    def presigned_url(self, key: str, seconds: int = 7 * 24 * 3600) -> str:
        """An HTTPS URL that reads `key` without credentials for `seconds` (SigV4 allows at most 7 days), signed
        here with this store's credentials: no request is made."""
        with self._errors(key, "sign"):
            return str(self.client.generate_presigned_url("get_object", ExpiresIn=seconds,
                                                          Params={"Bucket": self.bucket, "Key": self._key(key)}))

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
        """Turn boto3's and botocore's errors into a StorageError naming the URI and the reason; what may pass
        on its own (throttling, 5xx, timeouts, connections) into a TransientStorageError."""
        try:
            yield
        except ClientError as err:
            kind, message = (TransientStorageError if _is_transient(err) else StorageError,
                             self._client_error_message(key, doing, err))
        except (BotoConnectionError, HTTPClientError) as err:  # refused, DNS, TLS, timeouts, dropped connections
            kind, message = TransientStorageError, self._botocore_error_message(key, doing, err)
        except (BotoCoreError, Boto3Error) as err:
            kind, message = StorageError, self._botocore_error_message(key, doing, err)
        else:
            return
        # botocore's own exception is not chained: its text holds the endpoint URL, password and all
        raise kind(redact(message, self.settings.secrets)) from None

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


# S3 error codes that say "try again later" (botocore's standard retry mode retries these too, a few times)
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                              "500", "502", "503", "504"})


def _is_transient(err: ClientError) -> bool:
    status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return _error_code(err) in _TRANSIENT_CODES or status >= 500 or status == 429


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
