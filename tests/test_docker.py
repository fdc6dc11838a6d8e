"""docker/: both Dockerfiles pass hadolint and keep what README promises (the package installed, a
non-root user, an exec-form `deltaserve serve` entrypoint, a health check that works, models under
HF_HOME); compose.yaml is valid against the compose spec and resolves to the services README
describes. Building and running an image is docker/smoke-test.sh's job: minutes, not CI."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server_harness import REPO, ThreadServer, write_tiny_model
from engine.engine import EngineConfig

DOCKER = REPO / "docker"
DOCKERFILES = {"cuda": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
COMPOSE = DOCKER / "compose.yaml"


def tool(name: str) -> str:
    """A command-line tool from the `test` extra (beside this Python first); missing is a failure."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def instructions(dockerfile: Path, final_stage_only: bool = False) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    pairs = [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]
    if final_stage_only:
        last_from = max(i for i, (name, _) in enumerate(pairs) if name == "FROM")
        pairs = pairs[last_from:]
    return pairs


def last(dockerfile: Path, name: str) -> str:
    found = [args for inst, args in instructions(dockerfile, final_stage_only=True) if inst == name]
    assert found, f"{dockerfile.name} has no {name} in its final stage"
    return found[-1]


def distribution_packages() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_passes_hadolint(kind):
    result = subprocess.run([tool("hadolint"), str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_installs_every_package_of_the_distribution(kind):
    steps = instructions(DOCKERFILES[kind])
    kept = {line.strip().strip("!/") for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}
    copied = set()
    for inst, args in steps:
        if inst == "COPY" and "--from" not in args:
            sources = args.split()[:-1]
            copied |= kept if sources == ["."] else {Path(source).name for source in sources}
    needed = {"pyproject.toml", "README.md", *distribution_packages()}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    assert needed <= kept, f".dockerignore leaves out {needed - kept}"
    assert any(inst == "RUN" and re.search(r"pip install (--no-deps )?/src", args) for inst, args in steps)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_runs_as_a_non_root_user(kind):
    user = last(DOCKERFILES[kind], "USER").split(":")[0]
    assert user not in ("root", "0"), user


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_entrypoint_is_exec_form_deltaserve_serve_on_all_interfaces(kind):
    dockerfile = DOCKERFILES[kind]
    assert json.loads(last(dockerfile, "ENTRYPOINT")) == ["deltaserve", "serve"]
    assert json.loads(last(dockerfile, "CMD")) == ["--host", "0.0.0.0", "--port", "8000"]
    assert last(dockerfile, "EXPOSE") == "8000"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_keeps_models_in_a_volume_at_hf_home(kind):
    dockerfile = DOCKERFILES[kind]
    assert any(inst == "ENV" and "HF_HOME=/models" in args.split() for inst, args in instructions(dockerfile))
    assert json.loads(last(dockerfile, "VOLUME")) == ["/models"]


def healthcheck_command(dockerfile: Path) -> list[str]:
    args = last(dockerfile, "HEALTHCHECK")
    return json.loads(args[args.index("CMD") + len("CMD"):])


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_healthcheck_passes_on_a_live_server_and_fails_on_none(kind, tmp_path):
    command = healthcheck_command(DOCKERFILES[kind])
    assert "http://127.0.0.1:8000/health" in command[-1]
    server = ThreadServer(write_tiny_model(tmp_path / "m"), EngineConfig(max_num_seqs=2))
    try:
        live = [part.replace("http://127.0.0.1:8000", server.url) for part in command]
        assert subprocess.run([sys.executable, *live[1:]], capture_output=True).returncode == 0
    finally:
        server.stop()
    assert subprocess.run([sys.executable, *live[1:]], capture_output=True).returncode != 0


def test_cuda_image_has_what_triton_compiles_its_launchers_with():
    steps = instructions(DOCKERFILES["cuda"])
    base = next(args for inst, args in steps if inst == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=nvidia/cuda:1[23]\.[\d.]+-runtime-ubuntu[\d.]+", base), base
    assert ("FROM", "${BASE_IMAGE}") in steps
    installs = " ".join(args for inst, args in steps if inst == "RUN" and "apt-get install" in args).split()
    assert {"gcc", "python3-dev"} <= set(installs)


def test_cpu_image_takes_its_base_image_and_a_local_torch_wheel_from_the_build():
    steps = instructions(DOCKERFILES["cpu"])
    assert any(inst == "ARG" and args.startswith("BASE_IMAGE=") for inst, args in steps)
    assert any(inst == "FROM" and args.startswith("${BASE_IMAGE}") for inst, args in steps)
    assert ("COPY", "docker/wheels/ /tmp/wheels/") in steps
    assert any(inst == "RUN" and "/tmp/wheels/torch-*.whl" in args for inst, args in steps)
    # The wheel stays in the build stage: the final image copies only the installed environment.
    final = instructions(DOCKERFILES["cpu"], final_stage_only=True)
    assert not any(inst == "COPY" and "wheels" in args for inst, args in final)


def test_cpu_image_installs_the_dependencies_of_pyproject_less_triton(tmp_path):
    run = next(args for inst, args in instructions(DOCKERFILES["cpu"]) if inst == "RUN" and "tomllib" in args)
    words = shlex.split(run)
    snippet = words[words.index("-c") + 1]
    requirements = subprocess.run([sys.executable, "-c", snippet.replace("/src/", f"{REPO}/")],
                                  capture_output=True, text=True, check=True).stdout.split("\n")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [r for r in requirements if r] == [d for d in dependencies if not d.startswith("triton")]


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


def test_compose_file_is_valid_against_the_compose_spec():
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_rejects_a_service_key_the_spec_does_not_have(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("    profiles: [cpu]\n", "    profiles: [cpu]\n    gpus_all: true\n"))
    assert bad.read_text() != COMPOSE.read_text()
    assert check_compose_schema(bad).returncode != 0


def compose_config(**env: str) -> dict:
    """What Docker Compose itself makes of compose.yaml, every profile on."""
    result = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "--profile", "*", "config", "--format", "json"],
                            capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_runs_the_cuda_image_on_all_gpus_and_the_cpu_image_in_the_cpu_profile():
    services = compose_config()["services"]
    gpu, cpu = services["deltaserve"], services["deltaserve-cpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile" and "profiles" not in gpu
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # -1: all
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu" and cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    for service in (gpu, cpu):
        assert Path(service["build"]["context"]) == REPO
        assert service["ports"][0]["target"] == 8000 and service["ports"][0]["published"] == "8000"
        assert service["volumes"][0]["target"] == "/models"
        assert service["restart"] == "unless-stopped"
        assert "/health" in " ".join(service["healthcheck"]["test"])
        assert service["command"] == ["--host", "0.0.0.0", "--port", "8000"]


def test_compose_passes_deltaserve_args_and_the_models_folder_to_the_server():
    services = compose_config(DELTASERVE_ARGS="--model /models/m --max-num-seqs 8", MODELS_DIR="/srv/models",
                              DELTASERVE_PORT="9000")["services"]
    for service in services.values():
        assert service["command"] == ["--host", "0.0.0.0", "--port", "8000", "--model", "/models/m",
                                      "--max-num-seqs", "8"]
        assert service["volumes"][0]["source"] == "/srv/models" and service["volumes"][0]["read_only"]
        assert service["ports"][0]["published"] == "9000"
