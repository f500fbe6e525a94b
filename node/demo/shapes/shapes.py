import math


def circle_area(r):
    return math.pi * r * r


def square_perimeter(side):
    return 4 * side
