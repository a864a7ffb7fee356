"""The canonical JSON every signed or sealed record is made of: one exact byte form per flavour."""

from securechat.canonical import canonical_json


def test_sealed_flavour_sorts_keys_drops_spaces_and_keeps_text_as_utf8() -> None:
    assert canonical_json({"b": 1, "a": "é✓", "c": [1, 2]}) == (
        '{"a":"é✓","b":1,"c":[1,2]}'.encode()
    )


def test_signed_flavour_escapes_everything_outside_ascii() -> None:
    assert canonical_json({"b": True, "a": "é"}, ascii_only=True) == b'{"a":"\\u00e9","b":true}'
