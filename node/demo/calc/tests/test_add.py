from calc import add


def test_small():
    assert add(1, 2) == 3


def test_negative():
    assert add(-1, -2) == -3


def test_float():
    assert add(0.1, 0.2) == 0.3  # fails: floating point
