def add(a, b):
    return a + b


def sub(a, b):
    # Bug on purpose: the demo shows a failing test.
    return a - b if b >= 0 else a + b
