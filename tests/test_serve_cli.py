"""`multigran serve` as a command: a real process that drains its open requests on SIGTERM, and a one-line error
when the `serve` extra is missing."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from multigran.cli import main
from multigran.tiny import build_tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_cli_avg")
    build_tiny(path, method="avg", seed=0)
    return path


def test_sigterm_drains_in_flight_requests(model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "multigran.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--served-model-name", "tiny", "--max-batch-size", "2", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Describe the picture in detail."}],
                "max_tokens": 80, "temperature": 0}
        started, lines, other = threading.Event(), [], {}

        def stream():
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        def plain():
            other["reply"] = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 60},
                                        timeout=120).json()

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for thread in threads:
            thread.start()
        assert started.wait(60)
        server.send_signal(signal.SIGTERM)  # both requests are in flight, the stream has just begun
        for thread in threads:
            thread.join(120)
        # uvicorn re-raises the signal once it has drained: the exit status is the signal's
        assert server.wait(60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][len("data: "):])["usage"]
    finish = [json.loads(line[6:])["choices"] for line in lines[:-2]]
    assert [c[0]["finish_reason"] for c in finish if c][-1] in ("length", "stop")
    assert usage["completion_tokens"] == 80 or [c[0]["finish_reason"] for c in finish if c][-1] == "stop"
    assert other["reply"]["choices"][0]["finish_reason"] in ("length", "stop")
    assert other["reply"]["usage"]["completion_tokens"] >= 1


def test_missing_serve_extra_is_one_line_naming_it(monkeypatch, capsys, model_dir):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("multigran: error:") and "'serve' extra" in err and "pip install 'multigran[serve]'" in err


def test_serve_arguments_are_checked(capsys, model_dir, tmp_path):
    assert main(["serve", "--model", str(model_dir), "--allowed-local-media-path", str(tmp_path / "none")]) == 2
    assert "--allowed-local-media-path" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1" in capsys.readouterr().err
