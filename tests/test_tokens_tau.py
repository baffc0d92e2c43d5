import pytest

from step_lightning.core import ConfigError
from step_lightning.tokens.tau import parse_tau

PAPER_TAUS = (6999, 6899, 4999, 4899, 4799, 4699, 4599, 4499)


def test_parse_int_and_string():
    assert parse_tau(6899) == (0.6, 0.8, 0.9, 0.9)
    assert parse_tau("6899") == (0.6, 0.8, 0.9, 0.9)
    assert parse_tau("4999") == (0.4, 0.9, 0.9, 0.9)
    assert parse_tau("0999") == (0.0, 0.9, 0.9, 0.9)
    assert parse_tau(" 4499 ") == (0.4, 0.4, 0.9, 0.9)


@pytest.mark.parametrize("tau", PAPER_TAUS)
def test_paper_values_are_tenths(tau):
    digits = [int(d) for d in str(tau)]
    assert parse_tau(tau) == tuple(d / 10 for d in digits)


@pytest.mark.parametrize("bad", [689, 68999, "6a99", -1, 6.8, 6899.0, "", "68 99", "-689", True, None, [6, 8, 9, 9]])
def test_rejects_anything_but_four_digits(bad):
    with pytest.raises(ConfigError, match="tau=6899 means 0.6/0.8/0.9/0.9 for 2x2/4x4/8x8/16x16"):
        parse_tau(bad)


def test_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_tau(689)
