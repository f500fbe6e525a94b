import sys

import pytest


def test_upper():
    assert "abc".upper() == "ABC"


def test_title():
    assert "hello world".title() == "Hello World"


def test_capitalize():
    assert "hello World".capitalize() == "Hello World"  # fails: capitalize lowers the rest


@pytest.mark.skipif(sys.maxsize > 0, reason="always skipped in the demo")
def test_skipped():
    assert False
