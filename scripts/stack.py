#!/usr/bin/env python3
"""`make stack`: the docker-compose stack (Redis + Triton + gateway), run natively on this machine.

    python scripts/stack.py [--checkpoint PATH | --checkpoint tiny] [--port 8080] [--state-dir .cache/stack]

Starts the three processes `docker-compose.yml` runs, without Docker:

- `redis-server` with the compose file's command (append-only file), on a free loopback port, its
  data in `<state-dir>/redis` (never the shared Redis on 6379);
- `tritonserver` from the nvidia-pytriton wheel (`service.triton_local.LocalTritonServer`) on a model
  repository exported into `<state-dir>/model_repository` (CPU instances) from `--checkpoint`: by
  default the demo checkpoint when one exists, else a tiny random-weights checkpoint made on the spot;
- the gateway, `fsar serve --backend triton`, with the compose gateway service's environment (read
  from the compose file and `.env` as compose would, then pointed at the local Triton and Redis).

It waits until the gateway's `/readyz` answers, prints the URLs (and one `FSAR_STACK {json}` line with
the process ids, for scripts), and on Ctrl-C / SIGTERM stops the gateway, Triton and Redis in that
order. If one of them dies, the others are stopped and the exit status is 1. Logs: `<state-dir>/*.log`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a file: make the project's packages importable
    sys.path.insert(0, str(REPO_ROOT))

from service.harness import GatewayError, LiveGateway, RedisServer, RedisServerError  # noqa: E402
from service.triton_local import LocalTritonServer  # noqa: E402

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DEFAULT_STATE_DIR = REPO_ROOT / ".cache" / "stack"
#: Where `make demo` leaves its trained checkpoint (first found wins), relative to the repository.
DEMO_CHECKPOINTS = ("runs/demo/best.pt", "runs/demo/last.pt", "demo/best.pt", "demo/checkpoint.pt")
TINY = "tiny"
STACK_LINE = "FSAR_STACK "
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class StackError(RuntimeError):
    """The stack cannot start; the message says why and what to do."""


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


# ====================================================================== compose file
def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines of a compose `.env` file (comments, blank lines and `export ` ignored)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose variable interpolation: `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$$`."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        value = variables.get(name)
        if op == ":-" and not value:
            return arg
        if op == "-" and value is None:
            return arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise StackError(f"{COMPOSE_FILE.name}: variable {name} is required: {arg}")
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def compose_services(compose_file: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The `services` of the compose file."""
    import yaml

    with open(compose_file) as handle:
        return yaml.safe_load(handle)["services"]


def gateway_environment(compose_file: Path = COMPOSE_FILE, base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The gateway service's environment as compose would give it: its `.env` file, then its
    `environment` entries (these win), values interpolated from the shell environment and `.env`."""
    base_env = dict(os.environ if base_env is None else base_env)
    dotenv = read_env_file(compose_file.parent / ".env")
    variables = {**dotenv, **base_env}  # the shell wins over .env in interpolation, as in compose
    service = compose_services(compose_file)["gateway"]
    env: dict[str, str] = {}
    for entry in service.get("env_file") or []:
        path = entry["path"] if isinstance(entry, dict) else entry
        env.update(read_env_file(compose_file.parent / path))
    environment = service.get("environment") or {}
    if isinstance(environment, list):  # the list form: ["KEY=value", ...]
        environment = dict(item.partition("=")[::2] for item in environment)
    for key, value in environment.items():
        env[key] = interpolate("" if value is None else str(value), variables)
    return env


def redis_command(compose_file: Path = COMPOSE_FILE) -> list[str]:
    """The compose redis service's command (`redis-server --appendonly yes ...`)."""
    command = compose_services(compose_file)["redis"].get("command") or ["redis-server"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


# ====================================================================== helpers
def check_port_free(port: int, what: str) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(f"port {port} for the {what} is in use; choose another with --port") from None


def log_tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ====================================================================== the checkpoint
def find_demo_checkpoint() -> Path | None:
    for relative in DEMO_CHECKPOINTS:
        if (REPO_ROOT / relative).is_file():
            return REPO_ROOT / relative
    return None


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A fsar-tiny checkpoint with random weights (seeded), for trying the stack without training."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.model import ModelConfig, build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(backbone="fsar-tiny", pretrained=None))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, extra={"made_by": "scripts/stack.py", "random_weights": True})
    return path


def resolve_checkpoint(choice: str | None, state_dir: Path) -> tuple[Path, bool]:
    """`(checkpoint, is_demo)`: the given file, the demo checkpoint, or a tiny random one."""
    if choice and choice != TINY:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise StackError(f"--checkpoint {choice}: no such file")
        return path.resolve(), False
    if choice is None:
        demo = find_demo_checkpoint()
        if demo is not None:
            say(f"serving the demo checkpoint {demo.relative_to(REPO_ROOT)}")
            return demo, True
        say("no demo checkpoint found (looked for " + ", ".join(DEMO_CHECKPOINTS) + "); making a tiny "
            "checkpoint with RANDOM weights on the spot: the API works, its predictions mean nothing "
            "(`make demo` trains a real one; --checkpoint PATH serves yours)")
    else:
        say("making a tiny checkpoint with RANDOM weights (--checkpoint tiny)")
    return make_tiny_checkpoint(state_dir / "tiny-random.pt"), True


# ====================================================================== the stack
class Stack:
    """The three processes; `start()` brings them up in dependency order, `stop()` takes them down."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir).resolve()
        self.compose_file = Path(args.compose_file).resolve()
        self.port = args.port
        self.redis: RedisServer | None = None
        self.triton: LocalTritonServer | None = None
        self.gateway: LiveGateway | None = None
        self.redis_port = args.redis_port
        self.stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def log(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        check_port_free(self.port, "gateway")
        env = gateway_environment(self.compose_file)  # read first: a broken compose file fails fast
        checkpoint, is_demo = resolve_checkpoint(self.args.checkpoint, self.state_dir)
        self.start_redis()
        self.start_triton(checkpoint)
        self.start_gateway(env, demo=is_demo)
        self.wait_ready()

    def start_redis(self) -> None:
        command = redis_command(self.compose_file)
        self.redis = RedisServer(self.state_dir / "redis", port=self.redis_port or None, args=command[1:],
                                 binary=command[0], log_path=self.log("redis"))
        say(f"starting Redis on 127.0.0.1:{self.redis.port} ({' '.join(self.redis.command[1:])})")
        try:
            self.redis.start()
        except RedisServerError as err:
            raise StackError(str(err)) from None

    def start_triton(self, checkpoint: Path) -> None:
        from training.export import export_repository

        repository = self.state_dir / "model_repository"
        if repository.exists():
            shutil.rmtree(repository)  # ours: exported afresh on every start
        summary = export_repository(checkpoint, repository, version=1, instance_kind=self.args.instance_kind)
        say(f"exported {checkpoint} ({summary['backbone']}, checkpoint {summary['checkpoint_hash'][:12]}) "
            f"to {repository}")
        say("starting Triton (loads three models; tens of seconds on a CPU)")
        self.triton = LocalTritonServer(repository, log_path=self.log("triton"),
                                        ready_timeout_s=self.args.ready_timeout)
        self.triton.start()
        say(f"Triton ready in {self.triton.startup_s:.1f} s")

    def start_gateway(self, compose_env: Mapping[str, str], demo: bool) -> None:
        env = dict(compose_env)
        assert self.triton is not None
        env.update({
            "FSAR_HOST": "127.0.0.1",
            "FSAR_PORT": str(self.port),
            "FSAR_BACKEND": "triton",
            "FSAR_TRITON_URL": self.triton.grpc_url,
            "FSAR_REDIS_URL": self.redis_url,
        })
        if demo:
            env.setdefault("FSAR_DEMO", "true")
        shown = {key: value for key, value in sorted(env.items()) if key.startswith("FSAR_")}
        say("starting the gateway: fsar serve --backend triton with " + " ".join(f"{k}={v}" for k, v in shown.items()))
        command = [sys.executable, "-m", "service.cli", "serve", "--backend", "triton"]
        self.gateway = LiveGateway(port=self.port, env=env, command=command, log_path=self.log("gateway"),
                                   cwd=REPO_ROOT, ready_timeout_s=self.args.ready_timeout).launch()

    def wait_ready(self) -> None:
        assert self.gateway is not None
        try:
            self.gateway.wait_ready(check=self.check_alive)
        except GatewayError as err:
            raise StackError(str(err)) from None

    def check_alive(self) -> None:
        """Raise when one of the three processes has died."""
        for name, child, log in (("Redis", self.redis, "redis"), ("the gateway", self.gateway, "gateway")):
            if child is not None and child.proc is not None and not child.alive():
                raise StackError(f"{name} exited with code {child.proc.returncode}; its log:\n"
                                 f"{log_tail(self.log(log))}")
        if self.triton is not None and not self.triton.running:
            raise StackError(f"Triton exited; its log:\n{self.triton.log_tail()}")

    # ------------------------------------------------------------------ report
    def describe(self) -> dict[str, Any]:
        triton = self.triton
        return {
            "gateway": {"url": self.url, "pid": self.gateway.proc.pid if self.gateway and self.gateway.proc else None,
                        "log": str(self.log("gateway"))},
            "triton": {"grpc": triton.grpc_url if triton else None, "http": triton.http_url if triton else None,
                       "metrics": triton.metrics_url if triton else None, "pid": triton.pid if triton else None,
                       "log": str(self.log("triton"))},
            "redis": {"url": self.redis_url, "pid": self.redis.proc.pid if self.redis and self.redis.proc else None,
                      "data": str(self.state_dir / "redis"), "log": str(self.log("redis"))},
            "state_dir": str(self.state_dir),
        }

    def announce(self) -> None:
        info = self.describe()
        print(f"\nfsar stack ready (Ctrl-C stops all three):\n"
              f"  gateway   {self.url}   (API docs {self.url}/docs, {self.url}/model, {self.url}/metrics)\n"
              f"  triton    gRPC {info['triton']['grpc']}   HTTP http://{info['triton']['http']}   "
              f"metrics {info['triton']['metrics']}\n"
              f"  redis     {self.redis_url}   (append-only file in {info['redis']['data']})\n"
              f"  logs      {self.state_dir}/{{gateway,triton,redis}}.log\n"
              f"  try it    python scripts/smoke.py --url {self.url}\n", flush=True)
        (self.state_dir / "stack.json").write_text(json.dumps(info, indent=2) + "\n")
        print(STACK_LINE + json.dumps(info), flush=True)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Gateway first (no new requests), then Triton, then Redis (it writes its append-only file)."""
        self.stopping = True
        if self.gateway is not None:
            say("stopping the gateway")
            self.gateway.stop(15.0)
        if self.triton is not None:
            say("stopping Triton")
            self.triton.stop()
        if self.redis is not None:
            say("stopping Redis")
            self.redis.stop()
        say("stopped")


class _Stop(Exception):
    """Raised from the signal handler to leave the wait loop."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run Redis + Triton + the gateway natively (the compose stack).")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to serve; default: the demo checkpoint if one exists, else a tiny "
                             "random-weights one made on the spot ('tiny' forces that)")
    parser.add_argument("--port", type=int, default=8080, help="gateway HTTP port (default 8080, as in compose)")
    parser.add_argument("--redis-port", type=int, default=0, help="Redis port (default: a free one)")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                        help="model repository, Redis data and logs (default .cache/stack)")
    parser.add_argument("--compose-file", default=str(COMPOSE_FILE), help="compose file to read the services from")
    parser.add_argument("--instance-kind", choices=("cpu", "gpu"), default="cpu", help="Triton instance kind")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for Triton and then the gateway to be ready")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack = Stack(args)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    code = 0
    try:
        stack.start()
        stack.announce()
        while True:
            stack.check_alive()
            time.sleep(0.5)
    except _Stop as stop:
        say(f"{stop} received")
    except Exception as err:  # noqa: BLE001 - one readable line (Triton's includes its log tail), then stop
        kind = "" if isinstance(err, StackError) else f"{type(err).__name__}: "
        print(f"[stack] error: {kind}{err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
