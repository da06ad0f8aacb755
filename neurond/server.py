"""`neurond serve`: the leader process. HTTP server, supervisor and engine on one asyncio loop.

Order matters: the HTTP port opens first (so /health answers and /ready says `loading`), and the model loads
in the background; loading inside ASGI startup would hit hypercorn's startup timeout with the port closed.
Signal handlers only set an event; the shutdown itself runs on the loop: stop accepting, fail what waits,
stop every rank (SIGTERM, then SIGKILL), exit.

The leader never imports torch: the built-in model is written by a child process, tokenisation uses the
tokenizers library, and all tensor work happens in the rank workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from neurond.api.app import API, ServedModel
from neurond.config import Config
from neurond.engine.deadline import StepDeadline
from neurond.engine.scheduler import Engine
from neurond.pool.supervisor import Supervisor

log = logging.getLogger("neurond")

# Exit codes: a documented contract with systemd and scripts (see docs/operations.md).
EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration or model directory
EXIT_SERVE_FAILED = 3  # the HTTP server could not start (port in use, ...)
EXIT_GAVE_UP = 4  # recovery gave up (crash-loop breaker); systemd's Restart= may start a fresh daemon


def resolve_model_dir(config: Config) -> Path:
    """The configured checkpoint directory, or the built-in model (written on first use by a child process)."""
    if config.model:
        path = Path(config.model)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        return path
    from neurond.models.builtin import builtin_dir

    target = builtin_dir(Path(config.cache_dir))
    if not (target / "model.safetensors").exists():
        log.info("writing the built-in model to %s (first use)", target)
        subprocess.run([sys.executable, "-m", "neurond.models.builtin", config.cache_dir], check=True)
    return target


def load_served_model(model_dir: Path, name: str) -> ServedModel:
    # PreTrainedTokenizerFast, not AutoTokenizer: importing the latter pulls in torch, and the leader must not
    # load it (promise: no CUDA in the leader; tests check libtorch is never mapped here).
    from transformers import PreTrainedTokenizerFast

    if not (model_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    cfg = json.loads((model_dir / "config.json").read_text())
    context = int(cfg.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", 2048))
    stop_ids: set[int] = set()
    for source in (cfg, _read_json(model_dir / "generation_config.json")):
        eos = source.get("eos_token_id")
        stop_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    return ServedModel(name, tokenizer, context, frozenset(stop_ids), int(time.time()))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.shutdown = asyncio.Event()
        self.supervisor: Supervisor | None = None
        self.engine: Engine | None = None
        self.exit_code = EXIT_OK

    async def run(self) -> int:
        c = self.config
        model_dir = resolve_model_dir(c)
        model = load_served_model(model_dir, c.model_name())
        self.supervisor = Supervisor(c, str(model_dir))
        deadline = StepDeadline(c.step_deadline_floor_s, c.step_deadline_ceiling_s, c.step_deadline_factor)
        self.engine = Engine(self.supervisor, model.tokenizer, deadline=deadline, max_queued=c.max_queued_requests)
        api = API(model, self.engine, self.supervisor, max_body_bytes=c.max_body_bytes,
                  default_max_tokens=c.default_max_tokens)

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.shutdown.set)

        hc = HypercornConfig()
        hc.bind = [f"[{c.host}]:{c.port}" if ":" in c.host else f"{c.host}:{c.port}"]
        hc.errorlog = logging.getLogger("neurond.http")
        hc.accesslog = None
        hc.graceful_timeout = 5.0

        servers = [hypercorn_serve(api.app(), hc, shutdown_trigger=self.shutdown.wait)]
        if c.admin_socket:
            servers.append(self._admin_server())
        self.supervisor.on_gave_up.append(self._gave_up)

        self.engine.start()
        load_task = loop.create_task(self.supervisor.start(), name="neurond-load")
        log.info("serving %s (tp_size=%d) on %s", model.name, c.tp_size, hc.bind[0])
        try:
            await asyncio.gather(*servers)
        except OSError as exc:
            log.error("HTTP server failed: %s", exc)
            self.exit_code = EXIT_SERVE_FAILED
            self.shutdown.set()
        finally:
            log.info("shutting down")
            load_task.cancel()
            await self.engine.stop()
            await self.supervisor.stop()
            log.info("stopped; all ranks reaped")
        return self.exit_code

    def _admin_server(self):
        from neurond.api.admin import AdminAPI

        c = self.config
        token = Path(c.admin_token_file).read_text().strip()
        admin = AdminAPI(self.supervisor, token)
        hc = HypercornConfig()
        hc.bind = [f"unix:{c.admin_socket}"]
        hc.errorlog = logging.getLogger("neurond.admin")
        hc.accesslog = None
        hc.umask = 0o077  # the socket is for root/the service user only
        log.info("admin API on unix:%s (fault injection %s)", c.admin_socket, "ON" if c.fault_injection else "off")
        return hypercorn_serve(admin.app(), hc, shutdown_trigger=self.shutdown.wait)

    def _gave_up(self, cause) -> None:
        delay = self.config.unloaded_exit_s
        if delay <= 0:
            log.error("recovery gave up (%s); serving 503 until an operator reloads", cause.reason if cause else "?")
            return
        log.error("recovery gave up (%s); exiting with code %d in %.0f s", cause.reason if cause else "?",
                  EXIT_GAVE_UP, delay)

        def leave() -> None:
            if self.supervisor.state == "unloaded":
                self.exit_code = EXIT_GAVE_UP
                self.shutdown.set()

        asyncio.get_running_loop().call_later(delay, leave)


def serve(config: Config) -> int:
    return asyncio.run(Server(config).run())
