from __future__ import annotations

import subprocess
import sys

import lambdasplit


def test_every_exported_name_resolves() -> None:
    assert sorted(lambdasplit.__all__) == sorted(lambdasplit._EXPORTS)
    for name in lambdasplit.__all__:
        assert getattr(lambdasplit, name) is not None, name


def test_import_is_cheap_and_side_effect_free() -> None:
    code = "import sys, lambdasplit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
