"""Train/serve parity: for every image of a folder, `trainer evaluate` and the running inspector (frames
through Kafka) agree on the label and on every probability within 1e-4. Both read the image with OpenCV
and call stripnet.preprocess; this test catches any drift between the two paths."""

import asyncio
import json

import orjson
import pytest

from tests.helpers.streams import image_frames, produce, read_records, running_service, service_settings
from trainer.cli import main as trainer

pytestmark = pytest.mark.kafka

PER_CLASS = 8


@pytest.fixture
def folder(neu_cls, tmp_path):
    """The first PER_CLASS images of each NEU-CLS class, as an ImageFolder of links."""
    root = tmp_path / "images"
    for cls in sorted(p for p in neu_cls.iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:PER_CLASS]:
            (root / cls.name / image.name).symlink_to(image)
    return root


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_trainer_evaluate_and_the_inspector_agree_on_every_image(folder, tmp_path, kafka_broker, new_topic, backend):
    predictions = tmp_path / "predictions.json"
    assert trainer(["evaluate", "--model", "default", "--data", str(folder), "--predictions", str(predictions)]) == 0
    doc = json.loads(predictions.read_text())
    offline = {row["path"]: dict(zip(doc["class_names"], row["probabilities"], strict=True))
               for row in doc["predictions"]}
    assert len(offline) == 6 * PER_CLASS

    settings = service_settings(kafka_broker, new_topic(), None, backend=backend, max_batch=8)  # the bundled model
    frames = image_frames(folder, sorted(folder.rglob("*.jpg")))

    async def scenario():
        async with running_service(settings):
            await produce(settings.bootstrap_servers, settings.topic, frames)
            return await read_records(settings.bootstrap_servers, settings.output_topic, len(frames))

    records = asyncio.run(scenario())
    served = {event["frame_id"]: event for event in map(orjson.loads, (r.value for r in records))}
    assert set(served) == set(offline)
    for path, probs in offline.items():
        event = served[path]
        assert event["label"] == max(probs, key=probs.get), path
        assert event["probabilities"] == pytest.approx(probs, abs=1e-4), path
