"""Figure 7: uploading a checkpoint to a loopback S3 server, against s3fs and boto3 doing the same.

The server is moto's (``python -m moto.server``) in a process of its own, so that it does not
share this process's interpreter lock with the clients being timed. Every side sends the same
number of bytes to the same server; the baselines upload one file from local disk (page cache).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any, Iterator

from distrib.bench.core import MB, Figure, Settings, figure, fsync_write, interleave, timed
from distrib.bench.local import TrainingState
from distrib.checkpoint.storage import open_storage
from distrib.checkpoint.store import CheckpointStore

KEY, SECRET = "distrib-bench-key", "distrib-bench-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackS3:
    """A moto S3 server on 127.0.0.1 in a child process (needs the ``bench`` extra); ``env``
    holds the AWS variables that point a client at it."""

    def __init__(self, timeout: float = 30) -> None:
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", str(port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the moto S3 server did not start "
                                       "(pip install 'distrib[bench]')") from None
                time.sleep(0.2)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """Point this process's S3 clients at the server (``env`` in ``os.environ``), restoring
        the previous values afterwards."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def figure_7(settings: Settings) -> Figure:
    state = TrainingState(int(settings.size_mb / 8 * MB))
    server = LoopbackS3()
    try:
        with server.environ():
            return _measure(settings, state, server)
    finally:
        server.stop()


def _measure(settings: Settings, state: TrainingState, server: LoopbackS3) -> Figure:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client = server.client()
    client.create_bucket(Bucket=bucket)
    store = CheckpointStore(open_storage(f"s3://{bucket}/ours"))
    fs = s3fs.S3FileSystem()
    step = [0]

    def ours() -> float:
        step[0] += 1
        seconds = timed(lambda: store.save_state(step[0], state.state()))
        store.delete(store.inspect(step[0]))
        return seconds

    ours()  # warm-up: connections, buckets, code paths
    nbytes = _checkpoint_bytes(store, state)
    local = os.path.join(settings.workdir, "upload.bin")
    fsync_write(local, memoryview(os.urandom(nbytes)))

    def put_file() -> float:  # the s3fs baseline: one call, s3fs picks multipart itself
        seconds = timed(lambda: fs.put_file(local, f"{bucket}/s3fs.bin"))
        fs.rm_file(f"{bucket}/s3fs.bin")
        return seconds

    def upload_file() -> float:  # the boto3 baseline: its managed transfer, default settings
        seconds = timed(lambda: client.upload_file(local, bucket, "boto3.bin"))
        client.delete_object(Bucket=bucket, Key="boto3.bin")
        return seconds

    mine, s3fs_s, boto_s = interleave(settings.reps, [ours, put_file, upload_file])
    os.remove(local)
    return figure(7, [p / o for o, p in zip(mine, s3fs_s)],
                  {"checkpoint_mb": round(nbytes / MB, 1), "server": "moto (loopback)"},
                  {"ours_s": mine, "s3fs_put_file_s": s3fs_s, "boto3_upload_file_s": boto_s,
                   "vs_boto3_upload_file": [b / o for o, b in zip(mine, boto_s)]},
                  f"{nbytes / MB:.0f} MB; vs boto3 upload_file "
                  f"{statistics.median(b / o for o, b in zip(mine, boto_s)):.2f}")


def _checkpoint_bytes(store: CheckpointStore, state: TrainingState) -> int:
    """The bytes one checkpoint of ``state`` uploads (data files and manifest)."""
    info = store.save_state(10**6, state.state())
    manifest = len(store.storage.read(f"{info.name}/manifest.json"))
    store.delete(info)
    return info.size + manifest
