"""The `deltaserve` command as a user runs it."""

import socket
import subprocess
import sys

import pytest

from engine.demo import DEMO_CONFIG, write_gated_deltanet
from engine.generate import generate
from engine.loader import load_model
from engine.sampling import SamplingParams
from server.cli import build_parser, main


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.mark.parametrize("command", ["generate", "serve", "models"])
def test_every_subcommand_explains_itself(command):
    out = _run(command, "--help")
    assert out.returncode == 0
    assert "usage: deltaserve" in out.stdout


def test_generate_help_explains_each_option():
    text = _run("generate", "--help").stdout
    for option in ("--model", "--prompt", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed",
                   "--device", "--dtype", "--kernels", "--chat", "--ignore-eos"):
        assert option in text


def test_every_option_of_every_command_states_its_default():
    parser = build_parser()
    commands = {"deltaserve": parser, **parser._subparsers._group_actions[0].choices}
    missing = [f"{name} {action.option_strings[0]}" for name, command in commands.items()
               for action in command._actions
               if action.option_strings and not action.required and action.nargs != 0  # switches: off unless given
               and "default" not in (action.help or "")]
    assert not missing


def test_models_lists_supported_architectures(capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"gated_deltanet", "qwen3_5_text", "qwen3_next"} <= set(listed)


def test_generate_streams_what_the_engine_produces(tmp_path, capsys):
    folder = write_gated_deltanet(tmp_path / "m", DEMO_CONFIG, seed=0)
    assert main(["generate", "--model", str(folder), "--prompt", "Hello", "--max-tokens", "12",
                 "--ignore-eos", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    loaded = load_model(folder, device="cpu")
    expected = "".join(s.text for s in generate(loaded, "Hello", SamplingParams(max_tokens=12, ignore_eos=True)))
    assert captured.out == expected + "\n"
    assert "12 tokens, finish: length" in captured.err


def test_bad_model_folder_is_one_error_line_and_status_2(tmp_path):
    out = _run("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--device", "cpu")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("deltaserve: error:") and "does not exist" in out.stderr


def test_bad_sampling_option_is_a_clear_error(capsys):
    assert main(["generate", "--prompt", "hi", "--top-p", "0", "--device", "cpu"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_serve_exposes_engine_limits_and_rejects_bad_ones(capsys):
    text = _run("serve", "--help").stdout
    for option in ("--max-num-seqs", "--max-num-batched-tokens", "--max-model-len", "--gpu-memory-utilization",
                   "--no-cuda-graphs", "--max-queued-requests", "--drain-timeout"):
        assert option in text
    assert main(["serve", "--gpu-memory-utilization", "1.5", "--device", "cpu"]) == 2
    assert "gpu_memory_utilization" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("option, named", [(["--device", "bogus"], "--device 'bogus'"),
                                           (["--device", "mps"], "--device 'mps'"),
                                           (["--kernels", "triton", "--device", "cpu"], "--kernels triton")])
def test_device_or_kernels_that_cannot_run_are_one_error_line(command, option, named, monkeypatch, capsys):
    # Triton on the CPU needs its interpreter; without it the first forward failed (generate: a traceback;
    # serve: started, then every request failed). An unknown device was torch's traceback.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr("server.serve.serve", lambda *a, **k: pytest.fail("the server started"))
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, *prompt, *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaserve: error: ") and err.count("\n") == 1 and named in err


def test_gpu_index_beyond_the_cards_present_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert main(["generate", "--prompt", "hi", "--device", "cuda:2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaserve: error: --device cuda:2") and "only 2 CUDA device(s)" in err


def test_serve_refuses_a_port_it_cannot_listen_on_before_loading_anything(monkeypatch, capsys):
    # 70000 used to be served on 70000 % 65536 = 4464; a port in use failed only after start-up.
    monkeypatch.setattr("server.serve.serve", lambda *a, **k: pytest.fail("the server started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in [(["--port", "70000"], "--port must be in 0-65535"),
                              (["--port", "-1"], "--port must be in 0-65535"),
                              (["--port", str(port)], f"port {port} on 127.0.0.1 is already in use"),
                              (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:8000"),  # not this machine's
                              # an IPv6 documentation address: not this machine's, or IPv6 is off; in brackets
                              (["--host", "2001:db8::1"], "cannot listen on [2001:db8::1]:8000: "),
                              (["--drain-timeout", "nan"], "--drain-timeout")]:
            assert main(["serve", *args]) == 2, args
            err = capsys.readouterr().err
            assert err.startswith("deltaserve: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("where", ["missing/run.json", "."])
def test_bench_serve_refuses_a_json_path_it_cannot_write_before_running(where, tmp_path, monkeypatch, capsys):
    # It used to run the whole benchmark, then lose the record in a FileNotFoundError traceback.
    monkeypatch.setattr("clients.loadgen.run_bench_serve", lambda args: pytest.fail("the benchmark ran"))
    assert main(["bench-serve", "--json", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaserve: error: --json ") and err.count("\n") == 1


def test_serve_takes_max_request_bytes_and_refuses_one_below_1_before_loading(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("server.serve.serve", lambda model, engine_config, config, **kw: started.append(config))
    assert main(["serve", "--model", str(tmp_path), "--device", "cpu", "--port", "0",
                 "--max-request-bytes", "1234"]) == 0
    assert started[0].max_request_bytes == 1234
    assert main(["serve", "--model", str(tmp_path), "--device", "cpu", "--max-request-bytes", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "deltaserve: error: --max-request-bytes must be at least 1\n" and len(started) == 1


def test_max_request_bytes_defaults_to_the_servers_own_limit_and_says_so():
    from server.cli import build_parser
    from server.request_body import MAX_REQUEST_BYTES

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    action = next(a for a in serve._actions if "--max-request-bytes" in a.option_strings)
    assert action.default == MAX_REQUEST_BYTES and f"default: {MAX_REQUEST_BYTES}," in action.help
