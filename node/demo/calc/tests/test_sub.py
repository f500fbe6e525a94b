from calc import sub


def test_positive():
    assert sub(5, 3) == 2


def test_negative():
    assert sub(5, -3) == 8
