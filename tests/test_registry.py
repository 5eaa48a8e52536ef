"""One registry API (utils/registry.Registry): decorator registration and ``list_*()`` with a filter."""

from __future__ import annotations

import pytest
from torch import nn

from quantbench.data import DATASETS, list_datasets, register_dataset
from quantbench.errors import UnknownNameError
from quantbench.models import MODELS, ModelEntry, build_model, list_models, register_model
from quantbench.observers import OBSERVERS, Observer, build_observer, list_observers, register_observer
from quantbench.quant.scheme import QScheme
from quantbench.utils.registry import Registry


def test_decorator_registers_and_returns_the_object():
    reg: Registry[object] = Registry("thing")

    @reg.register("a")
    class A:
        pass

    @reg.register("b", wrap=lambda name, fn: (name, fn()))
    def b():
        return 3

    assert reg.get("a") is A and A.__name__ == "A"
    assert reg.get("b") == ("b", 3) and b() == 3
    assert reg.add("c", 1) == 1
    assert reg.list() == reg.names() == ["a", "b", "c"] == list(reg)
    assert len(reg) == 3 and "a" in reg and "z" not in reg
    assert reg.items()[0] == ("a", A)


def test_list_filters_with_globs_and_excludes():
    reg: Registry[int] = Registry("thing")
    for i, n in enumerate(["resnet18", "resnet50", "resnet20_cifar", "mobilenet_v2", "mobilenet_v3_large"]):
        reg.add(n, i)
    assert reg.list("resnet*") == ["resnet18", "resnet20_cifar", "resnet50"]
    assert reg.list("resnet*", exclude="*_cifar") == ["resnet18", "resnet50"]
    assert reg.list(["mobilenet*", "*50"], exclude=["*large"]) == ["mobilenet_v2", "resnet50"]
    assert reg.list("nothing*") == []


@pytest.mark.fault(input="a name registered twice in one registry (a plugin reusing a built-in name)",
                   message="observer 'minmax' is registered twice", exit_code=1,
                   kept="the first registration; the second is refused")
def test_duplicate_names_are_refused_and_the_first_kept():
    reg: Registry[int] = Registry("observer")
    reg.add("minmax", 1)
    with pytest.raises(ValueError, match="observer 'minmax' is registered twice"):
        reg.add("minmax", 2)
    assert reg.get("minmax") == 1


@pytest.mark.fault(input="an unknown model / dataset / observer name", exit_code=2,
                   message="unknown model 'resnet2'; valid models: ...", kept="nothing runs")
def test_unknown_names_list_the_valid_ones():
    for reg in (MODELS, DATASETS, OBSERVERS):
        with pytest.raises(UnknownNameError) as info:
            reg.get("resnet2")
        assert reg.list()[0] in str(info.value)


def test_list_models_datasets_observers():
    assert list_models("resnet*_cifar") == ["resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar"]
    assert list_models(family="small") == ["digits_cnn", "digits_dwcnn", "vgg11_cifar", "vgg11a_cifar", "vgg11b_cifar",
                                           "vgg11c_cifar"]
    assert set(list_models()) == set(MODELS.names()) and "mobilenet_v2" in list_models()
    assert "mobilenet_v3_large" not in list_models("mobilenet*", exclude="*large")
    assert list_datasets() == ["cifar10", "digits", "imagefolder"]
    assert list_datasets("image*") == ["imagefolder"]
    assert "ema_minmax" in list_observers("ema_*") and "kld" not in list_observers("ema_*")


def test_new_entries_register_with_one_decorator_each():
    """A model, a dataset kind and an observer: each one decorator (cleaned up afterwards)."""
    try:
        @register_model("tiny_test_net", input_size=(1, 4, 4), num_classes=2, mean=(0.0,), std=(1.0,),
                        family="small", description="test only")
        def tiny(width_mult: float, num_classes: int) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))

        assert isinstance(MODELS.get("tiny_test_net"), ModelEntry)
        assert build_model("tiny_test_net")[1].out_features == 2
        assert register_model(ModelEntry("tiny_test_net2", tiny, (1, 4, 4), 2, (0.0,), (1.0,), "small", "t")).name \
            == "tiny_test_net2"

        @register_dataset("tiny_test_data", channels=1, needs_path=False, description="test only")
        def tiny_data(path, *, mean, std, input_size, augment):
            raise AssertionError("not called")

        kind = DATASETS.get("tiny_test_data")
        assert (kind.builder, kind.channels, kind.needs_path) == (tiny_data, 1, False)

        @register_observer("tiny_test_obs")
        class TinyObserver(Observer):
            pass

        assert TinyObserver.name == "tiny_test_obs"
        obs = build_observer("tiny_test_obs", QScheme(bits=8))
        assert isinstance(obs, TinyObserver)
    finally:
        for reg, name in [(MODELS, "tiny_test_net"), (MODELS, "tiny_test_net2"), (DATASETS, "tiny_test_data"),
                          (OBSERVERS, "tiny_test_obs")]:
            reg._items.pop(name, None)


def test_backends_and_qat_algorithms_list_in_the_same_style():
    from quantbench.backends import list_backends, load_backend
    from quantbench.qat.quantizers import ALGORITHMS, list_algorithms

    assert list_backends("t*") == ["tensorrt", "tvm"]
    assert list_backends(deployable=False) == [n for n in list_backends() if not load_backend(n).deployable]
    assert "academic" in list_backends(deployable=False) and "academic" not in list_backends(deployable=True)
    assert list_algorithms("lsq*") == ["lsq", "lsq+"]
    assert "apot" not in list_algorithms(deployable=True)
    assert all(not ALGORITHMS.get(n).academic_only for n in list_algorithms(deployable=True))
