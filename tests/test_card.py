"""Quantization cards: generated from the run, valid against the shipped JSON schema for every backend,
and saying what the backend spec and the run's quantizers say."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from quantbench.backends import backend_names, load_backend
from quantbench.cards import card_errors, card_schema, to_markdown, validate_card
from quantbench.errors import QuantbenchError
from quantbench.sweep.execute import execute
from quantbench.sweep.expand import expand
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.methods import ContextCache
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

CACHE = ContextCache()


def _cards(**sweep) -> dict[str, dict]:
    jobs = expand(parse_sweep(tiny_sweep(**sweep), Path("."))).jobs
    out = {}
    for job in jobs:
        rec = execute(job, CACHE)
        assert rec.status == "done", rec.error
        out[job.config["backend"]] = rec.card
    return out


@pytest.fixture(scope="module")
def w4a8_cards() -> dict[str, dict]:
    return _cards(backends=backend_names(), bits=["W4A8"])


def test_schema_is_shipped_in_the_package():
    schema = card_schema()
    assert schema["$schema"].endswith("2020-12/schema") and "quantization_method" in schema["required"]


@pytest.mark.parametrize("backend", backend_names())
def test_card_of_every_backend_matches_the_schema_and_the_spec(w4a8_cards, backend):
    card = w4a8_cards[backend]
    validate_card(card)
    spec = load_backend(backend)
    qm, ops, mp = card["quantization_method"], card["quantized_operations"], card["mixed_precision"]
    assert qm["weights"]["granularity"] == spec.weight.granularity.replace("_", "-")
    assert qm["weights"]["symmetry"] == ("symmetric" if spec.weight.symmetric else "asymmetric")
    assert qm["activations"]["symmetry"] == ("symmetric" if spec.activation.symmetric else "asymmetric")
    assert qm["weights"]["scale"] == ("power-of-two" if spec.weight.scale_type == "pow2" else "float")
    assert qm["weights"]["calibration"] == "minmax" and qm["parameters"] == "static"
    outputs = spec.placement.mode == "outputs"
    skip = "quantized" if spec.placement.add_inputs else "partially quantized"  # openvino: conv branch in float
    assert ops["skip_connection"]["policy"] == (skip if outputs else "full precision")
    assert ops["residual_connection"]["policy"] == ("quantized" if outputs else "full precision")
    assert ops["bn_folded"] is spec.fold_bn
    faithful = card["run"]["faithful_to"]  # which real runtime the number stands for
    assert all(f"{rt}: {how}" in faithful for rt, how in spec.faithful_to.items())
    assert spec.faithful_to or faithful.startswith("no real runtime")
    edge = spec.first_last_bits(4)
    assert ops["first_layer"]["weight_bits"] == (edge if edge is not None else "fp32")
    assert ops["last_layer"]["output_bits"] == "fp32", "logits stay in float"
    assert 4 in mp["allowed_bitwidths"]["weights"] and mp["allowed_bitwidths"]["activations"] == [8]
    assert 4 <= mp["average_weight_bits"] <= 8 and mp["average_activation_bits"] == 8
    assert mp["max_feature_map_bytes"] >= mp["average_feature_map_bytes"] > 0
    assert mp["model_size_bytes"] < mp["fp32_model_size_bytes"]
    rc, pm = card["resource_complexity"], card["pretrained_model"]
    assert rc["calibration_examples"] == 32 and rc["labels_used"] is False and "unlabeled" in rc["calibration_data"]
    assert rc["training_examples"] == "n/a" and rc["fraction_of_epoch"] > 0
    assert pm["n_test"] == 64 and pm["relative_degradation_percent"] == pytest.approx(
        100 * (pm["baseline_top1"] - pm["quantized_top1"]) / pm["baseline_top1"], abs=1e-3)
    assert all(v.startswith("n/a") for v in card["not_applicable"].values())


def test_academic_activations_are_adaptive_and_first_last_8_bit(w4a8_cards):
    card = w4a8_cards["academic"]
    assert card["quantization_method"]["activations"]["signedness"].startswith("adaptive")
    assert card["mixed_precision"]["allowed_bitwidths"]["weights"] == [4, 8]
    assert card["quantized_operations"]["first_layer"]["weight_bits"] == 8


def test_policies_change_what_the_card_says():
    cards = _cards(backends=["tensorrt"], residual=["fp"], first_last=["fp"], name="policies")
    card = cards["tensorrt"]
    validate_card(card)
    ops = card["quantized_operations"]
    assert ops["residual_connection"]["policy"] == "full precision"
    assert ops["first_layer"]["weight_bits"] == ops["last_layer"]["weight_bits"] == "fp32"
    assert card["mixed_precision"]["float_layers"] == ["conv1", "fc"]


def test_markdown_has_the_five_categories_of_table_1(w4a8_cards):
    md = to_markdown(w4a8_cards["tensorrt"])
    for category in ("Quantization Method", "Quantized Operations", "Mixed Precision", "Resource Complexity",
                     "Pretrained Model"):
        assert f"| {category} |" in md
    assert "skip connections: quantized" in md and "of one training epoch" in md
    assert "| Faithful To | onnxruntime: bit-exact" in md  # and which real runtime the number stands for


def test_schema_catches_broken_cards(w4a8_cards):
    card = copy.deepcopy(w4a8_cards["snpe"])
    del card["mixed_precision"]["average_weight_bits"]
    card["quantized_operations"]["skip_connection"]["policy"] = "sometimes"
    card["pretrained_model"]["agreement"] = 3
    errors = card_errors(card)
    assert len(errors) == 3
    assert any("average_weight_bits" in e for e in errors)
    assert any(e.startswith("quantized_operations/skip_connection/policy") for e in errors)
    with pytest.raises(QuantbenchError, match="does not match its schema"):
        validate_card(card)
