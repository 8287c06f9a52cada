"""One year parser (workflows.config.parse_years) for the --years flags and the `years` key."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtsmap.pipeline.errors import ConfigError
from rtsmap.workflows.config import YEAR_MAX, YEAR_MIN, load_run_config, parse_years

years_in_range = st.integers(YEAR_MIN, YEAR_MAX)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2021", (2021,)),
        ("2019-2021", (2019, 2020, 2021)),
        ("2019,2021", (2019, 2021)),
        (" 2021 , 2019 - 2020 ", (2019, 2020, 2021)),
        ("2021,2021", (2021,)),
        (2021, (2021,)),
        ([2021, 2019], (2019, 2021)),
        ((2019, "2020-2021"), (2019, 2020, 2021)),
    ],
)
def test_forms(value, expected):
    assert parse_years(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "cannot read ''"),
        ("twenty", "cannot read"),
        ("2021-", "cannot read"),
        ("2021..2023", "cannot read"),
        ("2_021", "cannot read"),  # int() would read it
        ("２０２１", "cannot read"),  # so would these full-width digits
        ("1850", "1850 is outside 1950-2100"),
        ([1850], "1850 is outside 1950-2100"),
        ("2023-2021", "runs backwards; write 2021-2023"),
        ([], "no year given"),
        (True, "expected a year"),
        (2021.0, "expected a year"),
        ([[2021]], "got a list"),
        (None, "expected a year"),
    ],
)
def test_refusals(value, message):
    with pytest.raises(ConfigError, match=r"^years: .*" + message.replace("(", r"\(").replace(".", r"\.")):
        parse_years(value)


def test_flag_name_in_message():
    with pytest.raises(ConfigError, match=r"^--years: 1850 is outside"):
        parse_years("1850", name="--years")


def test_config_and_flag_agree(tmp_path):
    """`years: [1850]` in a file is refused as `--years 1850` is (it used to write rts_1850)."""
    path = tmp_path / "run.yaml"
    for text, flag in [("years: [1850]\n", "1850"), ("years: 2019-2021\n", "2019-2021"), ("years: [2019, 2021]\n", "2019,2021"),
                       ("years: 2021\n", "2021")]:
        path.write_text(text)
        try:
            from_file = load_run_config(path).years
        except ConfigError as exc:
            from_file = str(exc).split(": ", 1)[1]
        try:
            from_flag = load_run_config(None, {"years": flag}).years
        except ConfigError as exc:
            from_flag = str(exc)
        assert from_file == from_flag


@given(st.lists(years_in_range, min_size=1, max_size=8))
def test_round_trip_comma_list(years):
    expected = tuple(sorted(set(years)))
    assert parse_years(",".join(map(str, years))) == expected
    assert parse_years(years) == expected
    assert parse_years(",".join(map(str, expected))) == expected


@given(years_in_range, st.integers(0, 20))
def test_round_trip_range(start, length):
    end = min(start + length, YEAR_MAX)
    assert parse_years(f"{start}-{end}") == tuple(range(start, end + 1))


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=30), st.text(alphabet="0123456789-, ", max_size=30)))
def test_any_text_parses_or_is_refused(text):
    """Never a traceback: sorted unique years in range, or ConfigError."""
    try:
        years = parse_years(text)
    except ConfigError as exc:
        assert str(exc).startswith("years: ") and "\n" not in str(exc)
        return
    assert years and years == tuple(sorted(set(years)))
    assert all(YEAR_MIN <= y <= YEAR_MAX for y in years)
