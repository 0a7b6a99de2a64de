"""Serve compressed models outside PyTorch: ONNX export with a KV cache, and an onnxruntime runner.

Needs the ``onnx`` extra (``pip install 'rankwise[onnx]'``: onnx, onnxscript for ``torch.onnx``'s exporter,
onnxruntime).
"""

from rankwise.export.onnx import SUPPORTED_MODEL_TYPES, OnnxExport, OnnxLayout, check_exportable, export_onnx
from rankwise.export.runtime import Generation, OnnxCausalLM, max_logit_diff, torch_generate

__all__ = ["SUPPORTED_MODEL_TYPES", "Generation", "OnnxCausalLM", "OnnxExport", "OnnxLayout", "check_exportable",
           "export_onnx", "max_logit_diff", "torch_generate"]
