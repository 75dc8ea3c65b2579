"""`palitorch serve` as a user runs it: ready line on stdout, the options wired into the server, SIGTERM stops it
with exit 0; bad options are one-line errors (exit 2) before any model is loaded."""

import argparse
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from run_cli import cli
from serverkit import COMPLETIONS, TIMEOUT, call, chat, demo_examples

import palitorch
from palitorch.cli import serve as serve_cli

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"palitorch serve: (?P<name>\S+) on cpu, listening on (?P<url>http://127\.0\.0\.1:\d+)/v1 "
                   r"\(Ctrl-C to stop\)\n")


@pytest.fixture(scope="module")
def ref():
    """The expected answers: the bundled model, one request at a time, on the test's thread."""
    return palitorch.load()


@pytest.fixture(scope="module")
def demo():
    return demo_examples()


def palitorch_serve(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "palitorch", "serve", *map(str, argv)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def first_line(proc: subprocess.Popen) -> str:
    """The first line the process prints on stdout ("" if it ends first); a safety timeout, not a measurement."""
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    return lines.get(timeout=TIMEOUT)


def test_serve_answers_then_stops_on_sigterm(ref, demo):
    proc = palitorch_serve("--port", 0, "--quiet", "--device", "cpu", "--served-model-name", "shapes",
                           "--api-key", "k3y", "--max-new-tokens", 2, "--no-fetch", "--feature-cache-mb", 0)
    try:
        line = first_line(proc)
        ready = READY.fullmatch(line)
        assert ready and ready["name"] == "shapes", (line, proc.poll())
        url, auth = ready["url"], {"Authorization": "Bearer k3y"}
        e = demo[0]
        status, out, _ = call(url + COMPLETIONS, chat(e["path"], e["detect"], model="shapes"), headers=auth)
        assert status == 200, out
        expected = ref.generate(e["image"], e["detect"], max_new_tokens=2)  # --max-new-tokens: the default
        assert out["choices"][0]["message"]["content"] == expected.text
        assert out["choices"][0]["finish_reason"] == "length" and out["model"] == "shapes"
        status, out, _ = call(url + COMPLETIONS, chat(e["path"], e["detect"], max_tokens=8), headers=auth)
        assert out["choices"][0]["message"]["content"] == ref.generate(e["image"], e["detect"]).text  # overridden
        status, out, _ = call(url + COMPLETIONS, chat("http://127.0.0.1:9/a.png", "caption en"), headers=auth)
        assert status == 400 and "does not fetch" in out["error"]["message"]  # --no-fetch
        assert call(url + "/v1/models")[0] == 401  # --api-key
        assert call(url + "/health")[1]["model"] == "shapes"
        metrics = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
        assert "palitorch_feature_cache_bytes 0\n" in metrics  # --feature-cache-mb 0: the same image, no entry
        assert 'palitorch_feature_cache_lookups_total{result="hit"} 0\n' in metrics
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err
    assert err.splitlines()[-1] == "palitorch serve: stopped"


def test_a_second_ctrl_c_stops_at_once(pg1, demo):
    """The first Ctrl-C lets the request in progress finish and says how to stop at once; the second stops at
    once (exit 130), however long the answer would still take (8,000 tokens here)."""
    folder, _ = pg1
    proc = palitorch_serve("--port", 0, "--device", "cpu", "--model", folder, "--no-fetch")
    err_lines = queue.Queue()
    try:
        url = READY.fullmatch(first_line(proc))["url"]
        threading.Thread(target=lambda: [err_lines.put(line) for line in proc.stderr], daemon=True).start()
        body = chat(demo[0]["path"], "caption en", max_tokens=8000, min_tokens=8000)
        threading.Thread(target=lambda: _quietly(call, url + COMPLETIONS, body), daemon=True).start()
        deadline = time.monotonic() + TIMEOUT  # (a safety bound, not a measurement)
        while "palitorch_requests_running 1" not in urllib.request.urlopen(url + "/metrics").read().decode():
            assert time.monotonic() < deadline, "the request never started decoding"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        while "stopping:" not in (line := err_lines.get(timeout=TIMEOUT)):
            pass
        assert "finishing the 1 request(s) in progress (Ctrl-C again to stop at once)" in line, line
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    rest = []
    while not err_lines.empty():
        rest.append(err_lines.get())
    assert rest and rest[-1] == "palitorch serve: stopped at once; the requests in progress were not answered\n"
    assert not any("Traceback" in line for line in rest), rest


def _quietly(f, *args):
    try:
        f(*args)
    except OSError:  # the server went away mid-answer, as it should here
        pass


def test_a_model_that_cannot_load_is_a_one_line_error():
    proc = palitorch_serve("--port", 0, "--model", "/nonexistent")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("palitorch serve: error: ") and "/nonexistent" in err, err


@pytest.fixture
def before_anything(monkeypatch):
    """Fail if `serve` loads a model or takes over the signals (the options must be checked first)."""

    def refuse(*a, **k):
        raise AssertionError("serve went on past its option checks")

    monkeypatch.setattr(serve_cli, "load_pipeline", refuse)
    monkeypatch.setattr(serve_cli.signal, "signal", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be from 0 to 65535, got 70000"),
    (["--port", "-1"], "--port must be from 0 to 65535"),
    (["--port", "http"], "argument --port: invalid int value"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--max-body-mb", "0"], "--max-body-mb must be a number > 0"),
    (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    (["--max-body-mb", "nan"], "--max-body-mb must be a number > 0"),
    (["--max-body-mb", "inf"], "--max-body-mb must be a number > 0, got inf"),  # (was a traceback)
    (["--feature-cache-mb", "-1"], "--feature-cache-mb must be a number >= 0, got -1"),
    (["--feature-cache-mb", "nan"], "--feature-cache-mb must be a number >= 0"),
    (["--no-fetch", "--fetch-private"], "give one of them"),
    (["--allow-origin", "localhost:3000"], "--allow-origin 'localhost:3000': give an origin as browsers send it"),
    (["--allow-origin", "http://localhost:3000/"], "no path or trailing slash"),
])
def test_bad_options_are_one_line_errors(argv, message, before_anything, capsys):
    rc, out, err = cli(["serve", *argv], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert err.startswith("palitorch serve: error: ")


def test_a_port_in_use_is_a_one_line_error(before_anything, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = cli(["serve", "--port", port], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


def test_help_lists_the_flags(capsys):
    rc, out, _ = cli(["serve", "--help"], capsys)
    assert rc == 0
    for flag in ("--host", "--port", "--served-model-name", "--api-key", "--max-batch-size", "--no-fetch",
                 "--max-body-mb", "--max-queue", "--feature-cache-mb", "--quiet", "--allow-origin", "--model",
                 "--device", "--compile",
                 "--max-new-tokens", "--temperature", "--stop", "/v1/chat/completions"):
        assert flag in out, flag


def test_the_served_model_name():
    def name(**kw):
        return serve_cli.model_name(argparse.Namespace(**{"served_model_name": None, "model": None, "adapter": None,
                                                          **kw}))

    assert name() == "palitorch-default"
    assert name(model="/checkpoints/paligemma2-3b-pt-224/") == "paligemma2-3b-pt-224"
    assert name(model="/checkpoints/x", served_model_name="mine") == "mine"
    assert name(model="/checkpoints/x", adapter="/adapters/my-lora") == "my-lora"
    assert name(adapter="/runs/ft-lora/model/peft") == "ft-lora"  # a palitorch LoRA run's, by its run
    assert name(adapter="/runs/ft-lora/checkpoint-0000100/peft") == "ft-lora-checkpoint-0000100"


def test_a_model_that_cannot_answer_is_not_served(tmp_path):
    """Weights that compute NaN fail the warm-up: one line, exit 2, and the server never says it is listening."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan-model"
    shutil.copytree(palitorch.default_model_path(), folder)
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    proc = palitorch_serve("--port", 0, "--model", folder)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2 and out == "", (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("palitorch serve: error: the model failed its warm-up request") and "NaN" in last, err
    assert "Traceback" not in err


def test_serve_with_int8_weights_says_so_and_answers_as_the_int8_model(demo):
    proc = palitorch_serve("--port", 0, "--quiet", "--device", "cpu", "--quantize", "int8", "--no-fetch")
    try:
        line = first_line(proc)
        ready = re.fullmatch(r"palitorch serve: \S+ on cpu with int8 weights, listening on (?P<url>\S+)/v1 "
                             r"\(Ctrl-C to stop\)\n", line)
        assert ready, (line, proc.poll())
        e = demo[0]
        status, out, _ = call(ready["url"] + COMPLETIONS, chat(e["path"], e["detect"], logprobs=True))
        assert status == 200, out
        expected = palitorch.load(quantize="int8").generate(e["image"], e["detect"])
        assert out["choices"][0]["message"]["content"] == expected.text
        got = [t["logprob"] for t in out["choices"][0]["logprobs"]["content"]]
        assert got == pytest.approx(expected.logprobs, abs=1e-4)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
