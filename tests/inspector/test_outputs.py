"""Outputs: a defect event per frame and a dead letter per invalid record, built in one place, as Kafka records."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from aiokafka import TopicPartition

from inspector.codec import dumps, loads
from inspector.decode import Rejected
from inspector.outputs import Outputs, Thresholds, dead_letter, decide, defect_event
from inspector.records import Frame, Record
from inspector.settings import Settings
from schemas.checkpoint import ArchitectureSpec, BlockSpec, Manifest, OODSpec
from schemas.messages import Box, DeadLetter, DefectEvent, FrameHeaders, event_id_for

NOW = datetime.now(UTC)
MANIFEST = Manifest(
    model_name="m", model_version="v7", class_names=("a", "b", "c"), weights_sha256="0" * 64, parameters=1, macs=1,
    architecture=ArchitectureSpec(name="x", blocks=(BlockSpec(out_channels=4),), activation="relu", attention="none"),
    created_at=NOW,
)


def frame(**headers) -> Frame:
    meta = FrameHeaders(camera_id="cam-3", frame_id="coil/17.png", captured_at=NOW - timedelta(milliseconds=40),
                        encoding="png", **headers)
    record = Record(TopicPartition("frames", 2), 41, b"cam-3", b"...", tuple(meta.to_kafka()),
                    produced_at=NOW - timedelta(milliseconds=30), received_at=NOW - timedelta(milliseconds=20))
    return Frame(record, meta, np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize(("probs", "status"), [([0.1, 0.7, 0.2], "defect"), ([0.35, 0.4, 0.25], "uncertain")])
def test_an_event_carries_the_best_class_and_a_threshold_status(probs, status):
    event = defect_event(frame(coil_id="C9"), np.array(probs, np.float32), MANIFEST, thresholds=Thresholds(0.5),
                         inferred_at=NOW)
    assert (event.label, event.status, event.coil_id) == ("b", status, "C9")
    assert event.confidence == pytest.approx(probs[1])
    assert event.event_id == event_id_for("cam-3", "coil/17.png", "v7")
    assert (event.source.topic, event.source.partition, event.source.offset) == ("frames", 2, 41)
    assert event.model.version == "v7" and event.latency_ms >= 40
    assert DefectEvent.model_validate(loads(dumps(event))) == event


def test_located_boxes_are_copied_into_the_event():
    event = defect_event(frame(), np.array([0.8, 0.1, 0.1]), MANIFEST, thresholds=Thresholds(), inferred_at=NOW,
                         boxes=(Box(x0=1, y0=2, x1=5, y1=8, score=0.9),))
    assert [(b.x0, b.y0, b.x1, b.y1, b.score) for b in event.boxes] == [(1, 2, 5, 8, 0.9)]


def test_a_dead_letter_names_the_reason_and_the_frame_position():
    letter = dead_letter(frame().record, Rejected("undecodable", "not a valid PNG header"))
    assert (letter.reason, letter.key, letter.value_bytes) == ("undecodable", "cam-3", 3)
    assert letter.headers["frame_id"] == "coil/17.png" and letter.source.offset == 41
    assert DeadLetter.model_validate_json(dumps(letter)) == letter


def test_outputs_are_the_records_to_produce_each_finishing_its_input_record():
    outputs = Outputs(Settings(output_topic="events", dead_letter_topic="dlq", confidence_threshold=0.9))
    frames = [frame(), frame(coil_id="C1")]
    events = outputs.events(frames, np.array([[0.1, 0.7, 0.2], [0.95, 0.03, 0.02]], np.float32), None, MANIFEST, NOW)
    assert [(o.topic, o.key, o.source) for o in events] == [("events", b"cam-3", f.record) for f in frames]
    assert [o.message.status for o in events] == ["uncertain", "defect"]
    assert all(DefectEvent.model_validate_json(o.value) == o.message for o in events)
    assert dict(events[0].headers) == {"schema_version": b"3", "content-type": b"application/json"}
    record = frames[0].record
    letter = outputs.dead_letter(record, Rejected("empty", "the record has no value"))
    assert (letter.topic, letter.key, letter.source, dict(letter.headers)["reason"]) == ("dlq", b"cam-3", record,
                                                                                         b"empty")
    assert DeadLetter.model_validate_json(letter.value) == letter.message


WITH_DETECTOR = MANIFEST.model_copy(update={"ood": OODSpec(
    layer=0, threshold=20.0, false_unknown_rate=0.01, calibrated_on="validation", calibration_images=180, fitted_images=1440)})
PER_CLASS = Thresholds(confidence=0.5, per_class={"b": 0.8})


@pytest.mark.parametrize(("label", "confidence", "score", "status"), [
    ("b", 0.99, 20.0001, "unknown"),   # above the unknown threshold: unknown, however confident
    ("b", 0.99, 20.0, "defect"),       # a score equal to the threshold is not unknown
    ("b", 0.8, 3.0, "defect"),         # a confidence equal to the label's threshold is a defect
    ("b", 0.7999, 3.0, "uncertain"),   # just below the label's own threshold
    ("a", 0.5, 3.0, "defect"),         # a label without its own threshold uses the global one
    ("a", 0.4999, 3.0, "uncertain"),
    ("a", 0.2, 25.0, "unknown"),       # unknown wins over uncertain
    ("a", 0.9, None, "defect"),        # no score: never unknown
])
def test_the_status_rule_at_its_boundaries(label, confidence, score, status):
    assert decide(label, confidence, score, PER_CLASS, 20.0) == status


def test_without_a_detector_nothing_is_unknown_and_an_operator_threshold_overrides_the_models():
    assert decide("a", 0.9, 1e9, PER_CLASS, None) == "defect"
    assert Thresholds().unknown_for(MANIFEST) is None and Thresholds(unknown=1e9).unknown_for(MANIFEST) is None
    assert Thresholds().unknown_for(WITH_DETECTOR) == 20.0
    assert Thresholds(unknown=30.0).unknown_for(WITH_DETECTOR) == 30.0


def test_an_event_carries_its_score_and_the_threshold_it_was_judged_by():
    probs = np.array([0.05, 0.9, 0.05], np.float32)
    unknown = defect_event(frame(), probs, WITH_DETECTOR, thresholds=PER_CLASS, inferred_at=NOW, ood_score=31.5)
    assert (unknown.status, unknown.label, unknown.ood_score, unknown.model.ood_threshold) == ("unknown", "b", 31.5, 20.0)
    known = defect_event(frame(), probs, WITH_DETECTOR, thresholds=PER_CLASS, inferred_at=NOW, ood_score=12.0)
    assert known.status == "defect"
    plain = defect_event(frame(), probs, MANIFEST, thresholds=PER_CLASS, inferred_at=NOW)
    assert (plain.ood_score, plain.model.ood_threshold) == (None, None)
    assert DefectEvent.model_validate_json(dumps(unknown)) == unknown


def test_per_class_thresholds_and_the_unknown_threshold_come_from_the_settings():
    settings = Settings(output_topic="e", dead_letter_topic="d", class_thresholds={"b": 0.95}, ood_threshold=40.0)
    outputs = Outputs(settings)
    probs = np.array([[0.05, 0.9, 0.05], [0.05, 0.9, 0.05], [0.05, 0.96, 0.0]], np.float32)
    events = outputs.events([frame()] * 3, probs, None, WITH_DETECTOR, NOW, np.array([41.0, 39.0, 39.0]))
    assert [o.message.status for o in events] == ["unknown", "uncertain", "defect"]
    assert {o.message.model.ood_threshold for o in events} == {40.0}
