"""Request context -> context ids (ncf_ray/context.py): the mapping prepare used, and one-line errors."""

import calendar

import pytest

from ncf_ray.context import encode_context
from ncf_ray.errors import UserError

SPEC = {"n_ids": 1 + 24 + 7 + 2, "columns": [
    {"name": "hour", "kind": "hour", "offset": 1, "size": 24},
    {"name": "dow", "kind": "dow", "offset": 25, "size": 7},
    {"name": "device", "kind": "categorical", "offset": 32, "size": 2, "vocab": ["desktop", "mobile"]},
]}


def test_values_map_to_offset_plus_value():
    assert encode_context(SPEC, {"hour": 21, "dow": 4, "device": "mobile"}) == [1 + 21, 25 + 4, 32 + 1]
    assert encode_context(SPEC, {"hour": 0, "dow": "Sunday", "device": "desktop"}) == [1, 25 + 6, 32]


def test_unseen_category_is_unknown_and_omitted_time_comes_from_the_clock():
    # 2026-12-01 was a Tuesday (dow 1); 13:00 UTC.
    now = calendar.timegm((2026, 12, 1, 13, 0, 0))
    assert encode_context(SPEC, {"device": "tv"}, now=now) == [1 + 13, 25 + 1, 0]
    assert encode_context(SPEC, None, now=now) == [1 + 13, 25 + 1, 0]


@pytest.mark.parametrize("raw, field", [({"hour": 24}, "context.hour"), ({"hour": "9"}, "context.hour"),
                                        ({"dow": 7}, "context.dow"), ({"weather": "rain"}, "context.weather"),
                                        ({"device": 1.5}, "context.device")])
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")) as err:
        encode_context(SPEC, raw)
    assert "\n" not in str(err.value)


def test_a_model_without_context_refuses_one():
    assert encode_context(None, None) == []
    with pytest.raises(UserError, match="reads no context"):
        encode_context(None, {"hour": 3})
