from schemas.export import JSON_DIR, MODELS, main, rendered, stale


def test_committed_json_schemas_match_the_models():
    outdated = stale(rendered())
    assert not outdated, f"stale JSON Schema files {outdated}: run `make schemas` and commit schemas/json/"


def test_every_model_has_a_file_with_a_schema_version():
    for name in MODELS:
        assert (JSON_DIR / f"{name}.json").is_file()
    for name in ("frame_headers", "defect_event", "dead_letter"):
        assert "schema_version" in rendered()[JSON_DIR / f"{name}.json"]


def test_check_mode_reports_fresh_files():
    assert main(["--check"]) == 0
