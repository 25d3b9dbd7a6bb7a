"""benchmarks/pyspy.py: collapsed py-spy stacks → busy threads per inspector stage, per thread, hottest frames."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.pyspy import OTHER, summarize

LOOP = ("run (asyncio/runners.py:190);BaseEventLoop.run_forever (asyncio/base_events.py:607);"
        "Handle._run (asyncio/events.py:80)")
WORKER = "Thread._bootstrap (threading.py:1002);_WorkItem.run (concurrent/futures/thread.py:58)"
RAW = f"""\
thread (11): inference_0;{WORKER};OnnxRuntimeRunner.predict (inspector/runners.py:172);OnnxRuntimeRunner.forward (inspector/runners.py:168);Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:406) 300
thread (11): inference_0;{WORKER};OnnxRuntimeRunner.predict (inspector/runners.py:172);preprocess (stripnet/preprocess.py:50);stack (numpy/_core/shape_base.py:465) 20
thread (12): asyncio_0;{WORKER};_decode_all (inspector/source.py:111);decode_frame (inspector/decode.py:60);_pixels (inspector/decode.py:101) 100
thread (13): asyncio_1;{WORKER};_decode_all (inspector/source.py:111);decode_frame (inspector/decode.py:60);_pixels (inspector/decode.py:101) 50
thread (10): MainThread;{LOOP};Pipeline.publish (inspector/service.py:104);Outputs.events (inspector/outputs.py:48);dumps (inspector/codec.py:13) 10
thread (10): MainThread;{LOOP};Sink.produce (inspector/sink.py:34);AIOKafkaProducer.send (aiokafka/producer/producer.py:470);_SelectorSocketTransport.write (asyncio/selector_events.py:1057) 15
thread (10): MainThread;{LOOP};EpollSelector.select (selectors.py:468) 5
"""


def test_samples_are_grouped_by_stage_thread_and_innermost_frame(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(RAW)
    profile = summarize(raw, seconds=2.0, rate_hz=100)  # 200 samples = one thread busy throughout
    assert profile.samples == 500
    stages = {s.name: s for s in profile.categories}
    assert stages["inference (ONNX Runtime / torch)"].cores == pytest.approx(1.5)
    assert stages["preprocessing (resize, normalize)"].cores == pytest.approx(0.1)  # numpy inside stripnet.preprocess
    assert stages["decode (OpenCV, header checks)"].share == pytest.approx(0.3)
    assert stages["events and JSON (pydantic, orjson, uuid)"].cores == pytest.approx(0.05)
    assert stages["Kafka client (aiokafka)"].cores == pytest.approx(0.075)  # asyncio frames under aiokafka skipped
    assert stages[OTHER].cores == pytest.approx(0.025)  # only generic frames
    assert [s.name for s in profile.categories][0] == "inference (ONNX Runtime / torch)"  # most first
    threads = {s.name: s.cores for s in profile.threads}
    assert threads == pytest.approx({"inference_*": 1.6, "asyncio_*": 0.75, "MainThread": 0.15})
    assert profile.hottest[0].name.startswith("Session.run (onnxruntime")
    assert sum(s.share for s in profile.categories) == pytest.approx(1.0, abs=0.01)
