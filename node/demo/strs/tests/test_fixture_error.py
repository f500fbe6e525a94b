import pytest


@pytest.fixture
def broken():
    raise RuntimeError("fixture setup fails on purpose")


def test_ok():
    assert "a" * 3 == "aaa"


def test_uses_broken_fixture(broken):
    assert broken
