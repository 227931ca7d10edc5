"""The service's settings: one typed object from options, HISTOLITE_* variables or defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from histolite.serve.settings import ServeSettings


def test_settings_round_trip_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the CLI exports for uvicorn's workers rebuilds the very same settings."""
    given = ServeSettings(
        model_dir=tmp_path / "models",
        api_key="k",
        audit_db=None,
        threads=2,
        slide_root=tmp_path / "slides",
        docs=True,
        max_pixels=1_000_000,
    )
    for name, value in given.to_env().items():
        monkeypatch.setenv(name, value)
    rebuilt = ServeSettings()  # type: ignore[call-arg]
    assert rebuilt == given.model_copy(
        update={"model_dir": given.model_dir.resolve(), "slide_root": tmp_path / "slides"}
    )
    assert rebuilt.audit_db is None and rebuilt.docs is True and rebuilt.threads == 2


def test_options_beat_variables_and_defaults_are_written_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HISTOLITE_MAX_PIXELS", "5000")
    monkeypatch.setenv("HISTOLITE_SLIDE_JOBS_QUEUED", "3")
    settings = ServeSettings(model_dir=Path("m"), max_pixels=7000)
    assert settings.max_pixels == 7000 and settings.slide_jobs_queued == 3
    assert settings.max_concurrent_predictions == 2  # the default
    assert "[default: 60000000]" in ServeSettings.help("max_pixels")


def test_bad_values_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="max_concurrent_predictions"):
        ServeSettings(model_dir=Path("m"), max_concurrent_predictions=0)
    with pytest.raises(ValidationError, match="no_such_setting"):
        ServeSettings(model_dir=Path("m"), no_such_setting=1)  # type: ignore[call-arg]
