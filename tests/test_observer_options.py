"""Observer options are declared (one pydantic model per observer) and validated when a config is built."""

from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel, ValidationError

from quantbench.config import PTQConfig
from quantbench.errors import ConfigError, UnknownNameError
from quantbench.observers import OBSERVERS, ObserverOptionError, build_observer, validate_observer_options
from quantbench.observers.options import NoOptions
from quantbench.quant.scheme import QScheme


@pytest.mark.parametrize("name", OBSERVERS.names())
def test_every_observer_declares_its_options_with_the_constructors_defaults(name):
    cls = OBSERVERS.get(name)
    model: type[BaseModel] = cls.Options
    assert issubclass(model, NoOptions)
    params = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
              if p.name not in ("self", "scheme", "is_weight") and p.kind is p.POSITIONAL_OR_KEYWORD}
    declared = {k: f.default for k, f in model.model_fields.items()}
    assert declared == params
    assert validate_observer_options(name, {}) == {}
    build_observer(name, QScheme(bits=8), **declared)  # the declared defaults are accepted


@pytest.mark.fault(input="an observer option the observer does not take (w_observer_options: {bogus: 1})",
                   exit_code=2, kept="nothing runs; refused when the config is built",
                   message="observer 'mse': unknown option bogus=1; allowed options: bins (...), num_candidates (...)")
def test_unknown_option_names_observer_key_value_and_allowed():
    with pytest.raises(ObserverOptionError) as info:
        validate_observer_options("mse", {"bogus": 1})
    msg = str(info.value)
    assert "'mse'" in msg and "bogus=1" in msg and "num_candidates" in msg and "bins" in msg
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
    with pytest.raises(ObserverOptionError, match="allowed options: none"):
        validate_observer_options("minmax", {"alpha": 3})


@pytest.mark.fault(input="an out-of-range observer option (quantile alpha 1.5, kld bins 7, mse num_candidates "
                         "0 or true, norm p inf, ema_mse momentum 1)", exit_code=2,
                   message="observer 'quantile': option alpha=1.5 is invalid (Input should be less than or equal "
                           "to 1); allowed options: ...", kept="nothing runs; refused when the config is built")
@pytest.mark.parametrize(("name", "options", "key"), [
    ("quantile", {"alpha": 1.5}, "alpha=1.5"), ("kld", {"bins": 7}, "bins=7"),
    ("mse", {"num_candidates": 0}, "num_candidates=0"), ("mse", {"num_candidates": True}, "num_candidates=True"),
    ("norm", {"p": float("inf")}, "p=inf"), ("ema_mse", {"momentum": 1.0}, "momentum=1.0"),
    ("meanstd", {"alpha": "three"}, "alpha='three'"), ("clipstd", {"std_scale": 0}, "std_scale=0"),
])
def test_bad_values_name_observer_key_value_and_allowed(name, options, key):
    with pytest.raises(ObserverOptionError) as info:
        validate_observer_options(name, options)
    msg = str(info.value)
    assert f"observer {name!r}" in msg and key in msg and "allowed options:" in msg
    assert "\n" not in msg
    with pytest.raises(ObserverOptionError):
        build_observer(name, QScheme(bits=8), **options)


def test_valid_options_are_returned_coerced():
    assert validate_observer_options("quantile", {"alpha": 1}) == {"alpha": 1.0}
    assert validate_observer_options("ema_quantile", {"momentum": 0.5, "bins": 64}) == {"momentum": 0.5, "bins": 64}
    with pytest.raises(UnknownNameError):
        validate_observer_options("nope", {})


@pytest.mark.fault(input="ptq config / sweep / YAML with a bad a_observer_options (e.g. kld bins: 7)", exit_code=2,
                   message="a_observer_options: observer 'kld': option bins=7 is invalid (must be an even integer >= "
                           "2); allowed options: bins (...)", kept="nothing runs; refused when the config is built")
def test_bad_option_fails_when_the_config_is_built():
    with pytest.raises(ValidationError, match=r"a_observer_options: observer 'kld': option bins=7 is invalid"):
        PTQConfig(model="digits_cnn", a_observer="kld", a_observer_options={"bins": 7})
    with pytest.raises(ValidationError, match=r"w_observer_options: observer 'mse': unknown option nope=2"):
        PTQConfig(model="digits_cnn", w_observer_options={"nope": 2})  # PTQConfig's default w_observer: mse
    cfg = PTQConfig(model="digits_cnn", a_observer="ema_mse", a_observer_options={"momentum": 0.5})
    assert cfg.a_observer_options == {"momentum": 0.5}


def test_qat_config_checks_the_options_of_its_algorithms_default_observers():
    """QAT leaves the calibrators to the algorithm (lsq: mse/mse); their options are still checked up front."""
    from pydantic import ValidationError

    from quantbench.qat.config import QATConfig

    with pytest.raises(ValidationError, match="a_observer_options: observer 'mse': unknown option bogus"):
        QATConfig(model="digits_cnn", data="digits", algorithm="lsq", a_observer_options={"bogus": 1})
