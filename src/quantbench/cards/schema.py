"""The card JSON schema shipped with the package, and validation against it."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

from quantbench.errors import QuantbenchError

SCHEMA_FILE = "card.schema.json"


@cache
def card_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) every card satisfies."""
    text = resources.files("quantbench.cards").joinpath(SCHEMA_FILE).read_text()
    return json.loads(text)  # type: ignore[no-any-return]


def card_errors(card: dict[str, Any]) -> list[str]:
    """Every schema violation as ``path: message`` (empty when the card is valid)."""
    validator = Draft202012Validator(card_schema())
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(card)'}: {e.message}"
            for e in sorted(validator.iter_errors(card), key=lambda e: list(map(str, e.absolute_path)))]


def validate_card(card: dict[str, Any]) -> None:
    """Raise QuantbenchError listing the violations when ``card`` does not satisfy the schema."""
    errors = card_errors(card)
    if errors:
        raise QuantbenchError("quantization card does not match its schema:\n  " + "\n  ".join(errors))
