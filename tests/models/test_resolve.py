"""Checkpoint folders made from GGUF files: the config of a conversion says its weights are plain floats."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest

from lambdasplit.models.resolve import convert_gguf

GGUF_NOTE = {"dequantize": False, "gguf_file": "model.Q4_1.gguf", "quant_method": "gguf"}


def _folder(tmp_path: Path, config: dict[str, object]) -> Path:
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_folder_converted_by_an_earlier_version_loses_its_gguf_note(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"model_type": "llama", "hidden_size": 8, "quantization_config": GGUF_NOTE})
    # The folder exists: nothing is converted (the GGUF file is not even read), the note is dropped.
    assert convert_gguf(tmp_path / "absent.gguf", folder, quiet=True) == folder
    assert json.loads((folder / "config.json").read_text()) == {"hidden_size": 8, "model_type": "llama"}
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama"},
        {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
    ],
)
def test_other_configs_are_left_as_they_are(tmp_path: Path, config: dict[str, object]) -> None:
    folder = _folder(tmp_path, config)
    before = (folder / "config.json").read_text()
    convert_gguf(tmp_path / "absent.gguf", folder, quiet=True)
    assert (folder / "config.json").read_text() == before


def test_a_folder_that_cannot_be_written_keeps_its_note_and_still_resolves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _folder(tmp_path, {"model_type": "llama", "quantization_config": GGUF_NOTE})
    before = (folder / "config.json").read_text()

    def read_only(*args: object, **kwargs: object) -> None:  # as mkstemp fails in a read-only cache
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with caplog.at_level(logging.WARNING, logger="lambdasplit.models.resolve"):
        assert convert_gguf(tmp_path / "absent.gguf", folder, quiet=True) == folder
    assert (folder / "config.json").read_text() == before
    assert "keeps its GGUF quantization note" in caplog.text
