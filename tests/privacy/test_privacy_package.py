"""The product package: what a deployment uses, and the old names of the audit, which moved out."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lambdasplit.audit
import lambdasplit.privacy


@pytest.mark.parametrize("name", ["AuditReport", "AuditSettings", "run_audit"])
def test_the_audits_old_names_still_resolve_with_a_warning_naming_the_new_place(name: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"lambdasplit\.audit\.{name}"):
        value = getattr(lambdasplit.privacy, name)
    assert value is getattr(lambdasplit.audit, name)


def test_other_names_are_still_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        lambdasplit.privacy.no_such_name  # noqa: B018


def test_the_product_does_not_import_the_audit() -> None:
    code = (
        "import sys, lambdasplit.privacy, lambdasplit.split, lambdasplit.generation, lambdasplit.wire; "
        "print(sorted(m for m in sys.modules if m.startswith('lambdasplit.audit')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
