"""Real runtimes an exported model runs in (one file each): ``onnxruntime``, ``openvino``, ``tvm``, PyTorch's int8
engines ``torch-x86`` and ``torch-qnnpack``, and ``executorch`` (XNNPACK delegate)."""

from quantbench.deploy.runtimes import executorch, onnxruntime, openvino, torch_int8, tvm  # noqa: F401  (register)
from quantbench.deploy.runtimes.base import (
    DEPLOY_RUNTIMES,
    Loaded,
    OpReport,
    Runtime,
    RuntimeOptions,
    get_runtime,
    register_runtime,
)

__all__ = ["DEPLOY_RUNTIMES", "Loaded", "OpReport", "Runtime", "RuntimeOptions", "get_runtime", "register_runtime"]
