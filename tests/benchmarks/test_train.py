"""benchmarks.train: a worker measures a training step and a validation pass; the table compares allocators."""

from benchmarks.train import Cost, TrainReport, measure, render


def test_a_worker_measures_the_cpu_of_a_step_and_of_a_validated_image():
    cost = measure(steps=1, validation_images=4)
    assert cost.step_user_ms > 0 and cost.validate_user_ms > 0
    assert cost.step_kernel_ms >= 0 and cost.step_faults >= 0


def test_the_table_gives_each_allocator_and_their_ratio():
    def cost(step: float, val: float) -> Cost:
        return Cost(step_user_ms=step * 0.75, step_kernel_ms=step * 0.25, step_faults=10.0, validate_user_ms=val,
                    validate_kernel_ms=0.0, validate_faults=0.0)
    report = TrainReport(steps=2, validation_images=4, rounds=1, bf16=False,
                         runs={"keep": [cost(800, 2.0)], "glibc": [cost(1200, 3.0)]})
    text = render(report)
    assert "| keep | 800 (600 + 200) | 25% |" in text and "| glibc | 1,200 (900 + 300) |" in text
    assert "CPU per step: 1.50×; per validated image: 1.50×" in text
