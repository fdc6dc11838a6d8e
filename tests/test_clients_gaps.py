"""What a user of `deltaserve complete` / `chat` / `bench-serve` meets at the edges: a closed stdout, bad flag
values, Ctrl-C, and how much a percentile in the report rests on."""

import os
import subprocess
import sys

import pytest

from server_harness import REPO


def _cli(*args: str, stdout: int, stdin_text: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], input=stdin_text, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("command", ["complete", "chat"])
def test_a_closed_stdout_ends_the_command_quietly(server, command):
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first flush of streamed text fails, as under `| head` once it has quit
    try:
        args = ["--prompt", "The cat"] if command == "complete" else []
        out = _cli(command, "--url", server.url, "--max-tokens", "20", *args, stdout=writer, stdin_text="Hi\n")
    finally:
        os.close(writer)
    assert out.stderr == "" and out.returncode == 1
