"""Per-layer overrides as data: YAML specs, the Python API, precedence, first/last as overrides, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from quantbench.backends import LayerOverride, load_backend
from quantbench.backends.overrides import is_depthwise
from quantbench.cli.main import app
from quantbench.cli.options import parse_layer_bits, read_overrides
from quantbench.errors import ConfigError
from quantbench.graph.quantize import list_layers, list_quantizers, prepare
from quantbench.models import build_model

SPEC_DIR = Path(__file__).resolve().parents[1] / "src" / "quantbench" / "backends" / "specs"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(name, num_classes=10), torch.randn(1, 3, 32, 32)


def _spec_with(tmp_path: Path, base: str, overrides: list[dict]) -> Path:
    data = yaml.safe_load((SPEC_DIR / f"{base}.yaml").read_text())
    data["overrides"] = overrides
    path = tmp_path / f"{base}_mixed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _weight_schemes(gm) -> dict:
    return {name: layer.weight_quantizer.scheme if layer.weight_quantizer is not None else None
            for name, layer in gm.named_modules() if hasattr(layer, "weight_quantizer")}


def _input_schemes(gm) -> dict:
    """Layer module name -> scheme of the quantizer on its input (None: float input)."""
    by_name = {q.name: q.scheme for q in list_quantizers(gm) if q.role != "weight"}
    return {li.name: by_name[li.input_quantizer] if li.input_quantizer else None for li in list_layers(gm)}


# (model, three overrides, which layers each one must hit)
CASES = {
    "resnet20_cifar": [
        {"match": "layer2.*", "w_bits": 4, "weight": {"granularity": "per_tensor"}},
        {"match": "layer3.*.conv2", "a_bits": 6, "a_observer": "minmax"},
        {"match": "type:Linear", "keep_float": True},
    ],
    "mobilenet_v2": [
        {"match": "features.1[0-3].*", "w_bits": 5},
        {"match": "depthwise", "a_bits": 6, "activation": {"symmetric": True}},
        {"match": "classifier.*", "keep_float": True},
    ],
}


@pytest.mark.parametrize("model_name", sorted(CASES))
def test_yaml_spec_with_three_overrides_gives_exactly_those_schemes(tmp_path, model_name):
    entries = CASES[model_name]
    spec = load_backend(str(_spec_with(tmp_path, "fbgemm", entries)))
    model, example = _model(model_name)
    gm = prepare(model, spec, example, "mse", "mse")
    layers = {li.name: li for li in list_layers(gm)}
    modules = dict(model.named_modules())
    overs = [LayerOverride.model_validate(e) for e in entries]
    hit = {i: [n for n in layers if o.matches(n, modules[n])] for i, o in enumerate(overs)}
    assert all(hit.values()) and len(set().union(*hit.values())) < len(layers)  # each hits some, not all
    w_schemes, a_schemes = _weight_schemes(gm), _input_schemes(gm)
    base_a = spec.activation
    for name, li in layers.items():
        if name in hit[2]:
            assert li.kept_float and w_schemes[name] is None and li.w_bits is None, name
            continue
        want_w = spec.weight
        if name in hit[0]:
            want_w = want_w.model_copy(update={"bits": entries[0]["w_bits"], **entries[0].get("weight", {})})
        assert w_schemes[name] == want_w, name
        assert layers[name].overrides == [entries[i]["match"] for i in range(3) if name in hit[i]]
        if name in hit[1]:  # the input of these layers is read by them only
            want_a = base_a.model_copy(update={"bits": 6, **entries[1].get("activation", {})})
            assert a_schemes[name] == want_a, name
            q = next(q for q in list_quantizers(gm) if q.name == li.input_quantizer)
            assert q.observer == entries[1].get("a_observer", "mse")
        elif a_schemes[name] is not None:
            assert a_schemes[name] == base_a, name
    hit_inputs = {layers[n].input_quantizer for n in hit[1]}
    for q in list_quantizers(gm):  # every other quantizer keeps the backend's scheme
        if q.role != "weight" and q.name not in hit_inputs:
            assert q.scheme == base_a, q.name


def test_later_entries_win_field_by_field_and_prepare_overrides_come_last():
    model, example = _model("resnet20_cifar")
    spec = load_backend("fbgemm").configure(overrides=[
        LayerOverride(match="layer3.*", w_bits=4, a_bits=6),
        LayerOverride(match="layer3.0.*", w_bits=6),
    ])
    gm = prepare(model, spec, example, overrides=[LayerOverride(match="layer3.0.conv2", w_bits=2)])
    layers = {li.name: li for li in list_layers(gm)}
    assert layers["layer3.0.conv1"].w_bits == 6 and layers["layer3.1.conv1"].w_bits == 4
    assert layers["layer3.0.conv2"].w_bits == 2 and layers["layer3.0.conv2"].a_bits == 6  # a_bits kept
    assert layers["layer3.0.conv2"].overrides == ["layer3.*", "layer3.0.*", "layer3.0.conv2"]
    reordered = load_backend("fbgemm").configure(overrides=[
        LayerOverride(match="layer3.0.*", w_bits=6), LayerOverride(match="layer3.*", w_bits=4)])
    assert {li.w_bits for li in list_layers(prepare(model, reordered, example)) if li.name.startswith("layer3.")} == {4}


def test_bits_after_keep_float_quantize_the_layer_again():
    model, example = _model("resnet20_cifar")
    gm = prepare(model, load_backend("academic").configure(w_bits=4, a_bits=4), example, overrides=[
        LayerOverride(match="*", keep_float=True), LayerOverride(match="linear", w_bits=8)])
    layers = list_layers(gm)
    assert [li.name for li in layers if not li.kept_float] == ["linear"]
    assert layers[-1].w_bits == 8 and layers[-1].a_bits == 8  # a_bits from the first/last policy (academic: 8)
    assert all(li.a_bits is None for li in layers[:-1])  # inputs read only by float layers stay float


def test_a_quantizer_shared_by_layers_with_different_bits_takes_the_highest_and_says_so():
    model, example = _model("resnet20_cifar")
    gm = prepare(model, load_backend("fbgemm"), example, overrides=[LayerOverride(match="layer3.*", a_bits=4)])
    layers = {li.name: li for li in list_layers(gm)}
    # layer3.0.conv1 reads the output of the last layer2 add, which the layer3.0 add reads too (base 8 bits)
    assert layers["layer3.0.conv1"].a_bits == 8 and "highest precision" in layers["layer3.0.conv1"].note
    assert layers["layer3.0.conv2"].a_bits == 4 and layers["layer3.0.conv2"].note == ""
    noted = [q for q in list_quantizers(gm) if q.note]
    assert noted and all("layer3.0.conv1" in q.note or "layer3.1.conv1" in q.note or "layer3.2.conv1" in q.note
                         for q in noted)


def test_depthwise_and_type_matchers():
    model, _ = _model("mobilenet_v2")
    dw = [n for n, m in model.named_modules() if is_depthwise(m)]
    assert dw and all(model.get_submodule(n).groups == model.get_submodule(n).in_channels for n in dw)
    assert not is_depthwise(nn.Conv2d(4, 8, 3, groups=2)) and not is_depthwise(nn.Conv2d(4, 4, 1))
    lin = LayerOverride(match="type:Linear", w_bits=4)
    assert [n for n, m in model.named_modules() if lin.matches(n, m)] == ["classifier.1"]
    gm = prepare(model, load_backend("tensorrt"), torch.randn(1, 3, 32, 32),
                 overrides=[LayerOverride(match="depthwise", w_bits=6)])
    assert sorted(li.name for li in list_layers(gm) if li.w_bits == 6) == sorted(dw)


def _old_rule(gm, fl) -> tuple[dict, dict]:
    """What prepare did before overrides existed: edge weights at the first/last bits (None: float); an
    activation quantizer got them when all its consumers were edge layers."""
    meta = gm.meta["quantbench"]
    edge = {meta["first_layer"], meta["last_layer"]}
    targets = {n.name: str(n.target) for n in gm.graph.nodes if n.name in meta["weighted_layers"]}
    spec = meta["backend"]
    w = {targets[n]: (spec.first_last_bits(spec.weight.bits) if n in edge else spec.weight.bits)
         for n in meta["weighted_layers"]}
    a = {}
    for q in list_quantizers(gm):
        if q.role != "weight":
            c = set(q.consumers)
            a[q.name] = spec.first_last_bits(spec.activation.bits) if c and c <= edge else spec.activation.bits
    return w, a


@pytest.mark.parametrize("model_name", ["resnet20_cifar", "mobilenet_v2"])
@pytest.mark.parametrize("backend", ["academic", "fbgemm"])
@pytest.mark.parametrize("fl", ["fp", 8, 3])
def test_first_last_as_overrides_equals_the_old_behaviour(model_name, backend, fl):
    model, example = _model(model_name)
    spec = load_backend(backend).configure(w_bits=4, a_bits=4, first_last=fl)
    gm = prepare(model, spec, example)
    want_w, want_a = _old_rule(gm, fl)
    assert {li.name: li.w_bits for li in list_layers(gm)} == want_w
    got_a = {q.name: q.scheme.bits for q in list_quantizers(gm) if q.role != "weight"}
    assert got_a == {k: v for k, v in want_a.items() if v is not None}
    # the same as writing the overrides by hand
    first, last = list_layers(gm)[0].name, list_layers(gm)[-1].name
    fields = {"keep_float": True} if fl == "fp" else {"w_bits": fl, "a_bits": fl}
    by_hand = spec.configure(first_last="same", overrides=[LayerOverride(match=n, **fields) for n in (first, last)])
    gm2 = prepare(model, by_hand, example)
    assert [(q.name, q.scheme) for q in list_quantizers(gm2)] == [(q.name, q.scheme) for q in list_quantizers(gm)]


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.fault(input="an override pattern that matches no conv/linear layer",
                   message="override pattern 'layer9.*' matches no conv/linear layer; layers: conv1, ...",
                   exit_code=2, kept="nothing prepared; the float model is not modified")
def test_pattern_matching_no_layer_names_it_and_lists_the_layers():
    model, example = _model("resnet20_cifar")
    with pytest.raises(ConfigError, match=r"'layer9\.\*' matches no conv/linear layer; layers: conv1, layer1\.0"):
        prepare(model, load_backend("fbgemm"), example, overrides=[LayerOverride(match="layer9.*", w_bits=4)])


@pytest.mark.fault(input="a spec YAML whose override has an unknown key, bad bits, an unknown observer, "
                         "keep_float with bits, or nothing to set",
                   message="invalid backend spec PATH: ... (the key or value and why)", exit_code=2,
                   kept="the spec is refused when it is loaded, before any model is built")
@pytest.mark.parametrize(("entry", "why"), [
    ({"match": "conv1", "w_bitz": 4}, "w_bitz"),
    ({"match": "conv1", "w_bits": 40}, "less than or equal to 16"),
    ({"match": "conv1", "w_observer": "nosuch"}, "nosuch"),
    ({"match": "conv1", "keep_float": True, "w_bits": 4}, "keep_float"),
    ({"match": "conv1"}, "sets nothing"),
    ({"match": "conv1", "weight": {"signedness": "adaptive"}}, "adaptive signedness"),
    ({"match": "conv1", "w_bits": 4, "weight": {"bits": 6}}, "contradicts"),
])
def test_bad_override_in_a_spec_is_refused_on_load(tmp_path, entry, why):
    with pytest.raises(ConfigError, match=why):
        load_backend(str(_spec_with(tmp_path, "fbgemm", [entry])))


@pytest.mark.parametrize(("value", "want"), [
    ("layer3.*=4", {"w_bits": 4, "a_bits": None, "keep_float": False}),
    ("fc=w4a8", {"w_bits": 4, "a_bits": 8, "keep_float": False}),
    ("fc=W6", {"w_bits": 6, "a_bits": None, "keep_float": False}),
    ("type:Conv2d=a8", {"w_bits": None, "a_bits": 8, "keep_float": False}),
    ("conv1=fp", {"w_bits": None, "a_bits": None, "keep_float": True}),
])
def test_layer_bits_forms(value, want):
    lb = parse_layer_bits(value)
    assert {k: getattr(lb, k) for k in want} == want
    assert lb.to_override().match == value.partition("=")[0]


@pytest.mark.fault(input="--layer-bits with a value outside PATTERN=4 | PATTERN=w4a8 | PATTERN=a8 | PATTERN=fp",
                   message="--layer-bits takes PATTERN=BITS (weights), PATTERN=wBITSaBITS, ... got 'fc=x4'",
                   exit_code=2, kept="nothing run")
@pytest.mark.parametrize("value", ["fc", "fc=", "=4", "fc=x4", "fc=4.5", "fc=w", "fc=a8w4", "fc=0"])
def test_bad_layer_bits_values_name_the_option_and_the_forms(value):
    with pytest.raises(ConfigError, match=r"--layer-bits"):
        parse_layer_bits(value)


@pytest.mark.fault(input="--layer-bits 'fc=w40'", message="--layer-bits fc=...: Input should be less than or "
                   "equal to 16", exit_code=2, kept="nothing run")
def test_layer_bits_out_of_range_for_ptq():
    with pytest.raises(ConfigError, match="less than or equal to 16"):
        parse_layer_bits("fc=w40").to_override()


@pytest.mark.fault(input="--overrides FILE.yaml that is not a list of overrides, or with a bad entry",
                   message="--overrides FILE, entry 2: w_bitz: Extra inputs are not permitted", exit_code=2,
                   kept="nothing run")
def test_overrides_file_is_validated(tmp_path):
    good = tmp_path / "o.yaml"
    good.write_text("overrides:\n  - {match: 'layer3.*', w_bits: 4}\n  - {match: linear, keep_float: true}\n")
    assert [o.match for o in read_overrides(good)] == ["layer3.*", "linear"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {match: conv1, w_bits: 4}\n- {match: conv1, w_bitz: 4}\n")
    with pytest.raises(ConfigError, match=r"entry 2: w_bitz: Extra inputs are not permitted"):
        read_overrides(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("4\n")
    with pytest.raises(ConfigError, match="must hold a list of overrides"):
        read_overrides(scalar)


# -------------------------------------------------------------------------------------------- the CLI
def test_ptq_cli_layer_bits_reach_the_json_the_listing_and_the_card(tmp_path):
    from typer.testing import CliRunner

    out, card = tmp_path / "r.json", tmp_path / "card.json"
    over = tmp_path / "o.yaml"
    over.write_text("- {match: 'conv*', w_bits: 6}\n")
    res = CliRunner().invoke(app, [
        "ptq", "--model", "digits_cnn", "--data", "digits", "--backend", "fbgemm", "--overrides", str(over),
        "--layer-bits", "conv2=4", "--layer-bits", "fc=w8a6", "--max-test", "16", "--calib-size", "16",
        "--out", str(out), "--card", str(card), "--list-quantizers", "--quiet"])
    assert res.exit_code == 0, res.output
    layers = {li["name"]: li for li in json.loads(out.read_text())["layers"]}
    convs = [n for n in layers if n.startswith("conv")]
    assert layers["conv2"]["w_bits"] == 4 and all(layers[n]["w_bits"] == 6 for n in convs if n != "conv2")
    assert layers["fc"]["w_bits"] == 8 and layers["fc"]["a_bits"] == 6 and not layers["fc"]["kept_float"]
    assert "Layers (after per-layer overrides)" in res.output
    doc = json.loads(card.read_text())
    per_layer = {r["layer"]: r for r in doc["mixed_precision"]["per_layer"]}
    assert per_layer.keys() == layers.keys()
    assert per_layer["conv2"]["weight_bits"] == 4 and per_layer["fc"]["input_bits"] == 6
    assert doc["mixed_precision"]["allowed_bitwidths"]["weights"] == sorted({li["w_bits"] for li in layers.values()})


@pytest.mark.fault(input="quantbench ptq --layer-bits 'fc=x4'", message="error: --layer-bits takes PATTERN=BITS "
                   "(weights), ... got 'fc=x4'", exit_code=2, kept="nothing run, no file written")
def test_ptq_cli_bad_layer_bits_is_one_line(tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--layer-bits", "fc=x4",
                                   "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "--layer-bits takes PATTERN=BITS" in res.output
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.fault(input="quantbench ptq --layer-bits 'nosuch=4'", message="error: override pattern 'nosuch' "
                   "matches no conv/linear layer; layers: ...", exit_code=2, kept="no file written")
def test_ptq_cli_unmatched_pattern_is_one_line(tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--layer-bits", "nosuch=4",
                                   "--max-test", "8", "--calib-size", "8", "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "'nosuch' matches no conv/linear layer; layers: conv1" in res.output
    assert not out.exists()


# ------------------------------------------------------------------------------ size --layer-bits
def _size(*args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["size", "--model", "resnet20_cifar", *args])


def test_size_layer_bits_keeps_its_forms_and_takes_globs(tmp_path):
    plain, js, glob = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    assert _size("--layer-bits", "conv1=2,linear=4", "--out", str(plain)).exit_code == 0
    (tmp_path / "bits.json").write_text(json.dumps({"conv1": 2, "linear": "4"}))
    assert _size("--layer-bits", str(tmp_path / "bits.json"), "--out", str(js)).exit_code == 0
    assert json.loads(plain.read_text()) == json.loads(js.read_text())
    res = _size("--layer-bits", "layer3.*=2,layer3.0.conv1=fp", "--out", str(glob))
    assert res.exit_code == 0, res.output
    layers = {r["name"]: r["bits"] for r in next(iter(json.loads(glob.read_text()).values()))["layers"]}
    assert layers["layer3.0.conv1"] == 32 and layers["layer3.2.conv2"] == 2 and layers["layer2.2.conv2"] == 8


@pytest.mark.fault(input="quantbench size --layer-bits with a bad value (conv1=x, conv1, conv1=a8, a bad .json)",
                   message="error: --layer-bits takes PATTERN=BITS (weights), ... got 'conv1=x'", exit_code=2,
                   kept="nothing computed, no file written")
@pytest.mark.parametrize(("value", "why"), [
    ("conv1=x", "--layer-bits takes PATTERN=BITS"),
    ("conv1", "--layer-bits takes PATTERN=BITS"),
    ("conv1=a8", "weight bits only"),
    ("conv1=40", "1..32"),
    ("nosuch=4", "matches no conv/linear layer"),
    ("BAD.json", "cannot read the JSON file"),
])
def test_size_bad_layer_bits_is_one_line_not_a_traceback(tmp_path, value, why):
    if value == "BAD.json":
        value = str(tmp_path / "bad.json")
        Path(value).write_text("{conv1: 4")
    out = tmp_path / "s.json"
    res = _size("--layer-bits", value, "--out", str(out))
    assert res.exit_code == 2, res.output
    assert why in res.output and "Traceback" not in res.output and not out.exists()
