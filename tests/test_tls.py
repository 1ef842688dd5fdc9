"""A worker and a client over TLS (rediss://) to a redis-server that only speaks TLS.

Certificates are made here with openssl: a throwaway CA and a server certificate for 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis

from producer import Client

pytestmark = [pytest.mark.redis, pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("redis-server") is None,
                                                    reason="needs openssl and redis-server")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=redbatch-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
                             "--tls-ca-cert-file", str(d / "ca.crt"), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={d / 'ca.crt'}"
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)
    yield url, port
    proc.terminate()
    proc.wait(timeout=30)


def test_plain_connections_are_refused_by_the_tls_server(tls_redis):
    _, port = tls_redis
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()


def test_a_certificate_from_another_ca_is_refused(tls_redis, tmp_path):
    _, port = tls_redis
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "o.key", "-out", "other.crt", "-days", "2",
             "-subj", "/CN=other", cwd=tmp_path)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'other.crt'}").ping()


def test_worker_and_client_over_rediss(tls_redis, prefix, tiny_llama_path):
    url, _ = tls_redis
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--model-name", "tls-tiny", "--model-path",
           str(tiny_llama_path), "--redis-url", url, "--prefix", prefix, "--threads", "1", "--max-num-seqs", "2"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    client = Client(url, prefix=prefix)
    try:
        deadline = time.monotonic() + 120
        while not client.redis.zcard(client.keys.model_workers("tls-tiny")):
            assert proc.poll() is None and time.monotonic() < deadline, "the worker did not register over TLS"
            time.sleep(0.1)
        reply = client.get_model("tls-tiny").chat([{"role": "user", "content": "hello"}],
                                                  generate_config={"max_tokens": 5, "stream": False, "ignore_eos": True},
                                                  timeout_s=120)
        assert reply["usage"]["completion_tokens"] == 5
        streamed = list(client.get_model("tls-tiny").generate("one two", generate_config={"max_tokens": 3,
                                                                                         "ignore_eos": True}))
        assert streamed[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        client.redis.close()
