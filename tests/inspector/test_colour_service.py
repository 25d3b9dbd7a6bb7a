"""A colour model trained on X-SDD images serves colour frames through `inspector run`, end to end.

The model is trained by `trainer.train.fit` on a few X-SDD development images with `--color rgb` (their
channels happen to be equal, so `auto` would choose gray), published, and served by `inspector run` in a
child process. Its events must carry the probabilities the model gives offline to the frames' RGB pixels —
for the PNG/JPEG files themselves, for a tinted (truly colour) copy, and for that copy sent as raw rgb8 and
bgr8 — closer than the gap between that copy's RGB, BGR and gray readings (a briefly trained model reacts
little to colour, so the gap sets the scale). Skipped without the shared X-SDD folder.
"""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
import pytest
import torch

from schemas.messages import DefectEvent
from stripnet.checkpoint import load_checkpoint
from stripnet.preprocess import preprocess
from tests.helpers.harness import InspectorProcess
from tests.helpers.images import xsdd_dev
from tests.helpers.poison import encode
from tests.helpers.streams import Frame, encoded_frame, produce, read_records, service_settings
from trainer.publish import publish
from trainer.train import TrainConfig, fit

pytestmark = pytest.mark.kafka


def _tinted(rgb: np.ndarray) -> np.ndarray:
    """Red iron as a colour camera might see it: the red channel lifted, blue lowered."""
    out = rgb.astype(np.int16) + np.array([100, 0, -100], np.int16)
    return out.clip(0, 255).astype(np.uint8)


def test_a_colour_model_serves_colour_frames_end_to_end(kafka_broker, new_topic, tmp_path):
    data = xsdd_dev()
    run = fit(TrainConfig(data=data, out=tmp_path / "run", epochs=3, warmup_epochs=0, batch_size=16, limit_per_class=3,
                          color="rgb", split=(1.0,), select="last", threads=1, progress=False, model_version="colour-v1"))
    model, manifest = load_checkpoint(run.out / "model")
    assert (manifest.input.color, manifest.input.size) == ("rgb", 200)  # X-SDD's 128×128, upsampled to --min-size
    publish(run.out / "model", tmp_path / "models")

    files = [sorted((data / name).iterdir())[0] for name in manifest.class_names]
    rgb = {f"{p.parent.name}/{p.name}": cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
           for p in files}
    tinted = _tinted(next(iter(rgb.values())))
    h, w = tinted.shape[:2]
    frames: list[Frame] = [encoded_frame(name, (data / name).read_bytes(), "png" if name.endswith(".png") else "jpeg")
                           for name in rgb]
    frames += [encoded_frame("tinted.png", encode(".png", tinted[..., ::-1]), "png"),
               encoded_frame("tinted.rgb8", tinted.tobytes(), "raw", width=w, height=h, pixel_format="rgb8"),
               encoded_frame("tinted.bgr8", tinted[..., ::-1].tobytes(), "raw", width=w, height=h,
                             pixel_format="bgr8")]
    expected_pixels = {**rgb, "tinted.png": tinted, "tinted.rgb8": tinted, "tinted.bgr8": tinted}

    settings = service_settings(kafka_broker, new_topic(), tmp_path / "models")
    process = InspectorProcess(settings, tmp_path / "inspector").start()
    try:
        async def scenario():
            await process.wait_for_log("inspector_started", timeout_s=300)
            await produce(kafka_broker, settings.topic, frames)
            return await read_records(kafka_broker, settings.output_topic, len(frames), timeout_s=120)

        records = asyncio.run(scenario())
    finally:
        process.terminate()
    events = {e.frame_id: e for e in (DefectEvent.model_validate_json(r.value) for r in records)}
    assert set(events) == set(expected_pixels)
    with torch.no_grad():
        def probabilities(images: list[np.ndarray]) -> np.ndarray:
            return torch.softmax(model(preprocess(images, manifest.input)), dim=1).numpy()

        offline = dict(zip(expected_pixels, probabilities(list(expected_pixels.values())), strict=True))
        swapped, gray = probabilities([tinted[..., ::-1].copy(), cv2.cvtColor(tinted, cv2.COLOR_RGB2GRAY)])
    for frame_id, expected in offline.items():
        event = events[frame_id]
        assert event.model.version == "colour-v1"
        served = np.array([event.probabilities[name] for name in manifest.class_names])
        assert np.abs(served - expected).max() < 1e-4, (frame_id, served, expected)
        if frame_id.startswith("tinted"):  # fed as RGB: nearer the RGB prediction than to BGR's or gray's
            error = np.abs(served - expected).max()
            assert error < np.abs(served - swapped).max() and error < np.abs(served - gray).max(), frame_id
