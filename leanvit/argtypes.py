"""argparse types of the command line: each turns one argument into its value or names what was expected."""

import argparse
import json
import math


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be an integer >= 1, got {value}')
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be an integer >= 0, got {value}')
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f'must be a finite number >= 0, got {text}')
    return value


def number_in(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False):
    """An argparse type: a finite number of ``kind`` (int or float) between ``low`` and ``high`` (each closed unless
    marked open; None: unbounded). Its error names the range in TrainConfig's notation ('in (0, 1)', '>= 0'), so a
    flag and a recipe value out of range read alike."""
    if low is not None and high is not None:
        bounds = f' in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    elif low is not None:
        bounds = f' {">" if low_open else ">="} {low:g}'
    elif high is not None:
        bounds = f' {"<" if high_open else "<="} {high:g}'
    else:
        bounds = ''
    expected = ('an integer' if kind is int else 'a number') + bounds

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {expected}, got {text!r}') from None
        inside = ((kind is int or math.isfinite(value))  # an int is finite, and math.isfinite overflows on 10**400
                  and (low is None or (value > low if low_open else value >= low))
                  and (high is None or (value < high if high_open else value <= high)))
        if not inside:
            raise argparse.ArgumentTypeError(f'must be {expected}, got {value!r}')
        return value

    parse.__name__ = expected  # argparse names the type in some messages of its own
    return parse


# A share of the data held out (a validation split): some images on each side, so neither 0 nor 1.
fraction = number_in(float, 0, 1, low_open=True, high_open=True)
# A chance or a share that may be none or all: 0 and 1 included.
probability = number_in(float, 0, 1)


def metric_amount(text: str) -> float:
    """A count with an optional SI suffix: '1.5G', '600M', '25k' or a plain number."""
    scale = {'k': 1e3, 'K': 1e3, 'M': 1e6, 'G': 1e9}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number with an optional k/M/G suffix, such as 1.5G, got '
                                         f'{text!r}') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'must be a positive finite number, got {text}')
    return value


def milliseconds(text: str) -> float:
    """A duration in milliseconds: '12ms', '0.8ms', '1.5s', '250us', or a plain number of milliseconds."""
    units = (('us', 1e-3), ('µs', 1e-3), ('ms', 1.), ('s', 1e3))
    unit, scale = next(((u, f) for u, f in units if text.strip().endswith(u)), ('', 1.))
    try:
        value = float(text.strip()[:len(text.strip()) - len(unit)]) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a duration such as 12ms, 0.8ms or 1.5s, got {text!r}') from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f'must be a positive finite duration, got {text}')
    return value


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (keyword arguments), e.g. '{"num_classes": 10}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'is not valid JSON ({e}): {text}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"num_classes\": 10}}', got {text}")
    return value


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1, each once, in the order given."""
    try:
        values = [int(item) for item in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers such as 1,16, got {text!r}') from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f'batch sizes must be >= 1, got {text}')
    return list(dict.fromkeys(values))


# argparse names a type function in its "invalid ... value" message; these read as what was expected.
positive_int.__name__, non_negative_float.__name__, json_object.__name__ = 'positive integer', 'number', 'JSON object'
positive_ints.__name__ = 'list of positive integers'
