"""benchmarks.run: the project README's Performance tables are written from the results, between markers."""

import pytest

from benchmarks.run import GENERATED, ResultFile, write_project_readme, write_readme

RESULT = {"benchmark": "model", "title": "Model: a table", "command": "python -m benchmarks.run --only model",
          "started_at": "2026-12-01T10:00:00Z", "duration_s": 12.0,
          "machine": {"cpu": "AMD EPYC", "logical_cpus": 2, "torch": "2.14.1", "onnxruntime": "1.32.0",
                      "python": "3.11", "platform": "linux"},
          "load_average_start": {"one": 0.5, "five": 0.5, "fifteen": 0.5},
          "load_average_end": {"one": 1.0, "five": 0.5, "fifteen": 0.5},
          "options": {"quick": False, "threads": 1}, "markdown": "| a | b |\n|---|---|\n| 1 | 2 |", "result": {}}


def test_the_performance_block_is_rewritten_and_the_rest_of_the_readme_kept(tmp_path):
    (tmp_path / "model.json").write_text(ResultFile.model_validate(RESULT).model_dump_json())
    readme = tmp_path / "README.md"
    readme.write_text(f"# P\n\n## Performance\n\nhand-written intro\n\n{GENERATED[0]}\nold table\n{GENERATED[1]}\n\n"
                      "## Next\nkept\n")
    write_project_readme(tmp_path, readme)
    text = readme.read_text()
    assert "old table" not in text and "hand-written intro" in text and text.endswith("## Next\nkept\n")
    assert "### Model: a table" in text and "| 1 | 2 |" in text and "2026-12-01 10:00 UTC" in text
    write_project_readme(tmp_path, readme)
    assert readme.read_text() == text  # idempotent
    assert "## Model: a table" in write_readme(tmp_path).read_text()


def test_a_readme_without_the_markers_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("# P\n")
    with pytest.raises(ValueError, match="no"):
        write_project_readme(tmp_path, tmp_path / "README.md")


def test_a_result_names_the_vector_instructions_it_was_measured_with_and_an_older_one_none(tmp_path):
    newer = {**RESULT, "machine": {**RESULT["machine"], "isa": ["avx2", "avx512f", "avx512_bf16"]}}
    (tmp_path / "model.json").write_text(ResultFile.model_validate(newer).model_dump_json())
    assert "AMD EPYC, 2 logical CPUs (avx2 avx512f avx512_bf16) · torch" in write_readme(tmp_path).read_text()
    (tmp_path / "model.json").write_text(ResultFile.model_validate(RESULT).model_dump_json())
    assert "AMD EPYC, 2 logical CPUs · torch" in write_readme(tmp_path).read_text()
