"""A real S3-protocol server for the tests: moto in server mode, as a process.

Never a mock of the client: aiobotocore talks HTTP to it exactly as it would
to AWS or any S3-compatible server. moto does not check signatures, so the
signing of presigned URLs is tested apart (tests/test_presigned_urls.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3

from tests.support import until_sync

# Credentials moto accepts (any); set for the suite's processes and clients.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "sdapi-test-key",
    "AWS_SECRET_ACCESS_KEY": "sdapi-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MotoServer:
    """moto's S3 server on one port; stopping and starting it again keeps the
    port (the store's URL) but, like a wiped server, not its objects."""

    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_path = log_dir / f"moto-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._process is not None:
            return
        log = self._log_path.open("ab")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **S3_ENV},
        )
        log.close()
        until_sync(self._answers, timeout=60, what="moto's S3 server to answer")

    def _answers(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"moto exited: {self._log_path.read_text()[-2000:]}")
        try:
            # An http:// URL of our own making (S310 is about other schemes).
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):  # noqa: S310
                return True
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def client(self) -> Any:
        """A boto3 client, for a test to look at the bucket from outside."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self) -> str:
        name = f"sdapi-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def store_url(self, bucket: str, prefix: str = "images") -> str:
        """The SDAPI_STORAGE_URL of a bucket on this server."""
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}&region=us-east-1"

    def keys(self, bucket: str) -> list[str]:
        answer = self.client().list_objects_v2(Bucket=bucket)
        return sorted(item["Key"] for item in answer.get("Contents", []))
