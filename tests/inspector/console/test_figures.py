from __future__ import annotations

from inspector.console.figures import OTHER, FigureLimits, Figures, RateSeries

LIMITS = FigureLimits(max_keys=3, max_coils=2, max_coil_points=4, latency_samples=100, rate_window_s=60,
                      rate_bucket_s=10)


def test_counts_by_class_status_and_camera(make_event) -> None:
    figures = Figures(LIMITS)
    for i, (label, status, camera) in enumerate([("crazing", "defect", "a"), ("patches", "uncertain", "a"),
                                                 ("crazing", "defect", "b")]):
        figures.add_event(make_event(f"f{i}", label=label, status=status, camera_id=camera), now=100.0)
    snap = figures.snapshot(100.0)
    assert snap["events"] == 3
    assert snap["labels"] == {"crazing": 2, "patches": 1}
    assert snap["statuses"] == {"defect": 2, "uncertain": 1}
    assert snap["cameras"] == {"a": 2, "b": 1}


def test_names_from_messages_are_bounded(make_event) -> None:
    figures = Figures(LIMITS)
    for i in range(10):
        figures.add_event(make_event(f"f{i}", camera_id=f"cam-{i}"), now=0.0)
    cameras = figures.snapshot(0.0)["cameras"]
    assert len(cameras) == LIMITS.max_keys + 1
    assert cameras[OTHER] == 10 - LIMITS.max_keys
    assert sum(cameras.values()) == 10


def test_rates_per_class_over_the_window() -> None:
    rates = RateSeries(window_s=60, bucket_s=10)
    for _ in range(20):
        rates.add("crazing", 1005.0)  # bucket 1000..1010
    for _ in range(5):
        rates.add("patches", 1055.0)  # the current bucket, 5 s into it
    snap = rates.snapshot(1055.0)
    assert snap["bucket_s"] == 10 and snap["start"] == 1000
    assert snap["rates"]["crazing"] == [2.0, 0, 0, 0, 0, 0]
    assert snap["rates"]["patches"] == [0, 0, 0, 0, 0, 1.0]  # 5 events over the 5 s elapsed
    assert rates.snapshot(2000.0)["rates"] == {}  # everything fell out of the window


def test_latency_percentiles_over_recent_events(make_event) -> None:
    figures = Figures(LIMITS)
    assert figures.snapshot(0.0)["latency_ms"] == {"n": 0, "p50": None, "p95": None, "p99": None}
    for i in range(200):  # only the last latency_samples = 100 count: latencies 100..199
        figures.add_event(make_event(f"f{i}", latency_ms=float(i)), now=0.0)
    latency = figures.snapshot(0.0)["latency_ms"]
    assert latency["n"] == 100
    assert (latency["p50"], latency["p95"], latency["p99"]) == (149.5, 194.1, 198.0)


def test_models_in_service(make_event) -> None:
    figures = Figures(LIMITS)
    figures.add_event(make_event("f1", version="v1"), now=0.0)
    figures.add_event(make_event("f2", version="v2"), now=100.0)
    models = figures.snapshot(100.0)["models"]
    assert [(m["version"], m["in_service"]) for m in models] == [("v2", True), ("v1", False)]


def test_dead_letters_by_reason(make_dead_letter) -> None:
    figures = Figures(LIMITS)
    for reason in ("undecodable", "undecodable", "too_large"):
        figures.add_dead_letter(make_dead_letter(reason))
    assert figures.snapshot(0.0)["dead_letters"] == {"total": 3, "by_reason": {"undecodable": 2, "too_large": 1}}


def test_coil_map_places_each_defect_along_the_strip(make_event) -> None:
    figures = Figures(LIMITS)
    for i, (offset, label) in enumerate([(1.5, "crazing"), (40.0, "patches"), (12.0, "crazing")]):
        figures.add_event(make_event(f"f{i}", label=label, coil_id="C-7", strip_offset_m=offset), now=0.0)
    figures.add_event(make_event("no-offset", coil_id="C-7"), now=0.0)  # counted, not placed
    coil = figures.coil("C-7")
    assert coil is not None
    assert coil["counts"] == {"crazing": 3, "patches": 1}
    assert [p[:2] for p in coil["points"]] == [[1.5, "crazing"], [40.0, "patches"], [12.0, "crazing"]]
    assert coil["length_m"] == 40.0
    assert figures.coil("C-8") is None


def test_coils_and_their_points_are_bounded(make_event) -> None:
    figures = Figures(LIMITS)
    for i in range(10):
        figures.add_event(make_event(f"a{i}", coil_id="A", strip_offset_m=float(i)), now=0.0)
    for coil_id in ("B", "C"):
        figures.add_event(make_event(coil_id, coil_id=coil_id, strip_offset_m=0.0), now=0.0)
    assert figures.coil("A") is None  # the least recently seen coil went first
    assert [c["coil_id"] for c in figures.snapshot(0.0)["coils"]] == ["C", "B"]
    figures.add_event(make_event("b-more", coil_id="B", strip_offset_m=1.0), now=0.0)
    for i in range(10):
        figures.add_event(make_event(f"b{i}", coil_id="B", strip_offset_m=float(i)), now=0.0)
    assert len(figures.coil("B")["points"]) == LIMITS.max_coil_points
