"""The one metrics object: what the pieces report shows in the registry, the health state and the summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inspector.metrics import Metrics
from schemas.checkpoint import ArchitectureSpec, BlockSpec, Manifest
from schemas.messages import DeadLetter, DefectEvent, EventTimes, ModelRef, SourcePosition

SHA = "ab" * 32
AT = datetime(2025, 1, 1, tzinfo=UTC)


def make_manifest(version: str = "v1") -> Manifest:
    arch = ArchitectureSpec(name="t", blocks=(BlockSpec(out_channels=8, stride=2),), activation="gelu",
                            attention="eca")
    return Manifest(model_name="kd-eg-repvgg", model_version=version, architecture=arch,
                    class_names=("a", "b"), weights_sha256=SHA, parameters=1, macs=1, created_at=AT)


def event(label: str, latency_s: float, i: int = 0, status: str = "defect") -> DefectEvent:
    emitted = AT + timedelta(seconds=latency_s)
    return DefectEvent(event_id=f"00000000-0000-0000-0000-{i:012d}", frame_id=f"f{i}", camera_id="c", coil_id=None,
                       strip_offset_m=None, source=SourcePosition(topic="t", partition=0, offset=i), label=label,
                       confidence=0.9, probabilities={"a": 0.9, "b": 0.1}, status=status,
                       model=ModelRef(name="m", version="v1", sha256=SHA),
                       times=EventTimes(captured_at=AT, produced_at=AT, received_at=AT, inferred_at=AT,
                                        emitted_at=emitted), latency_ms=latency_s * 1000)


def letter(reason: str) -> DeadLetter:
    return DeadLetter(reason=reason, detail="x", source=SourcePosition(topic="t", partition=0, offset=9), key=None,
                      headers={}, value_bytes=3, received_at=AT, dead_lettered_at=AT)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.produced([event("a", 0.1)])
    assert samples(a)[("inspector_events_produced_total", ())] == 1
    assert samples(b)[("inspector_events_produced_total", ())] == 0


def test_what_the_pieces_report_is_in_the_registry() -> None:
    metrics = Metrics()
    before = samples(metrics)
    metrics.frames_consumed("strip.frames", 2, 5)
    metrics.frames_consumed("strip.frames", 2, 3)
    metrics.produced([event("a", 0.3, 1), event("b", -0.01, 2), letter("undecodable")])  # -0.01: clocks apart
    metrics.batch_done(8, queue_wait_s=0.004, inference_s=0.02, inference_cpu_s=0.015)
    metrics.decoded(0.003)
    metrics.consumer_lag("strip.frames", 2, 42)
    metrics.model_active(make_manifest("v7"))
    metrics.model_reload(True)
    metrics.model_reload(False)
    metrics.model_reload(False)
    a = samples(metrics)
    frames = ("inspector_frames_consumed_total", (("partition", "2"), ("topic", "strip.frames")))
    assert frames not in before and a[frames] == 8
    assert a[("inspector_events_produced_total", ())] == 2
    assert a[("inspector_events_by_class_total", (("label", "a"),))] == 1
    assert a[("inspector_dead_lettered_total", (("reason", "undecodable"),))] == 1
    assert a[("inspector_batch_size_count", ())] == 1 and a[("inspector_batch_size_sum", ())] == 8
    assert a[("inspector_batch_size_bucket", (("le", "8.0"),))] == 1
    assert a[("inspector_batch_size_bucket", (("le", "4.0"),))] == 0
    assert a[("inspector_queue_wait_seconds_sum", ())] == pytest.approx(0.004)
    assert a[("inspector_inference_seconds_sum", ())] == pytest.approx(0.02)
    assert a[("inspector_inference_cpu_seconds_total", ())] == pytest.approx(0.015)
    assert a[("inspector_decode_cpu_seconds_total", ())] == pytest.approx(0.003)
    assert a[("inspector_event_latency_seconds_count", ())] == 2
    assert a[("inspector_event_latency_seconds_sum", ())] == pytest.approx(0.3)
    assert a[("inspector_consumer_lag", (("partition", "2"), ("topic", "strip.frames")))] == 42
    assert a[("inspector_model_info", (("name", "kd-eg-repvgg"), ("sha256", SHA), ("version", "v7")))] == 1
    assert before[("inspector_model_reloads_total", (("result", "failure"),))] == 0
    assert a[("inspector_model_reloads_total", (("result", "success"),))] == 1
    assert a[("inspector_model_reloads_total", (("result", "failure"),))] == 2


def test_the_summary_reads_the_registry_and_the_recent_latencies() -> None:
    metrics = Metrics()
    assert metrics.summary().as_log() == {"frames": 0, "events": 0, "dead_letters": 0, "batches": 0, "per_class": {},
                                          "per_status": {"defect": 0, "uncertain": 0, "unknown": 0},
                                          "events_per_s": 0.0, "dead_letter_reasons": {}}
    metrics.frames_consumed("t", 0, 4)
    metrics.batch_done(2, 0.0, 0.01, 0.01)
    metrics.batch_done(1, 0.0, 0.01, 0.01)
    metrics.produced([event("b", 0.010, 1), event("a", 0.020, 2, "unknown"), event("b", 0.030, 3), letter("empty")])
    metrics.model_active(make_manifest("v3"))
    summary = metrics.summary()
    assert summary.per_status == {"defect": 2, "uncertain": 0, "unknown": 1}
    assert samples(metrics)[("inspector_events_by_status_total", (("status", "unknown"),))] == 1
    assert (summary.frames, summary.events, summary.dead_letters, summary.batches) == (4, 3, 1, 2)
    assert summary.per_class == {"a": 1, "b": 2} and summary.dead_letter_reasons == {"empty": 1}
    assert (summary.latency_p50_ms, summary.mean_batch, summary.model_version) == (20.0, 1.5, "v3")
    assert summary.events_per_s > 0
    assert metrics.summary().events_per_s == 0.0  # events/s counts from the previous summary


def test_model_info_shows_only_the_active_version() -> None:
    metrics = Metrics()
    metrics.model_active(make_manifest("v1"))
    metrics.model_active(make_manifest("v2"))
    versions = [dict(labels)["version"] for (name, labels), value in samples(metrics).items()
                if name == "inspector_model_info" and value == 1]
    assert versions == ["v2"]


def test_lag_of_revoked_partitions_is_dropped_when_the_group_is_left() -> None:
    metrics = Metrics()
    metrics.group_joined(True)
    metrics.consumer_lag("strip.frames", 0, 10)
    metrics.group_joined(False)
    assert not any(name == "inspector_consumer_lag" for name, _ in samples(metrics))


def test_ready_needs_a_model_and_the_group_and_a_failure_ends_liveness() -> None:
    metrics = Metrics()
    seen = [metrics.health()]
    metrics.model_active(make_manifest("v3"))
    seen.append(metrics.health())
    metrics.group_joined(True)
    seen.append(metrics.health())
    metrics.failed("engine thread died")
    seen.append(metrics.health())
    assert [(h.live, h.ready) for h in seen] == [(True, False), (True, False), (True, True), (False, False)]
    assert seen[-1].failure == "engine thread died" and seen[2].model_version == "v3"
    assert samples(metrics)[("inspector_ready", ())] == 0
