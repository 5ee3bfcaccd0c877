"""Assertions shared by the test modules (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations


def assert_one_line_error(result, prog: str, *fragments: str, code: int = 2) -> None:
    """Exit status ``code`` and one line on stderr, ``prog: error: ...`` naming every
    fragment, no traceback."""
    err = result.err.strip()
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err
    assert "\n" not in err, err
    assert err.startswith(prog), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
