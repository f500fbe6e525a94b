from shapes import square_perimeter


def test_square():
    assert square_perimeter(3) == 12


def test_zero():
    assert square_perimeter(0) == 0
