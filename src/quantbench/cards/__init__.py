"""Quantization cards (seed 004 section 3): built from what a run did; Markdown and schema-checked JSON."""

from quantbench.cards.build import CARD_VERSION, CardInputs, build_card
from quantbench.cards.render import to_markdown
from quantbench.cards.schema import card_errors, card_schema, validate_card

__all__ = ["CARD_VERSION", "CardInputs", "build_card", "card_errors", "card_schema", "to_markdown", "validate_card"]
