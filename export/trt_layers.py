"""The layer report of a built engine: how many layers run INT8, FP16 or FP32, and how many on the DLA.

Input: IEngineInspector.get_engine_information(LayerInformationFormat.JSON) of an engine built with
profiling_verbosity = DETAILED (NvInferRuntime.h IEngineInspector, TensorRT >= 8.2): {"Layers": [...]}, each
layer a dict with "Name", "LayerType", "Inputs"/"Outputs" whose "Format/Datatype" says the precision
("Row major linear FP32", "Four wide channel vectorized row major Int8 format", ...). Without DETAILED a
layer is only its name. A layer's precision is its first input's, as TensorRT's engine explorer reads it
(tools/experimental/trt-engine-explorer/trex/layer.py). DLA layers: a "LayerType" naming DLA, or, where the
type does not say, the "{ForeignNode[...]}" subgraphs of an engine that copies tensors "to nvm" / "from nvm"
(the DLA's memory; trtexec --dumpProfile of a DLA engine, NVIDIA/TensorRT#3143). Standard library only.
"""

import json
import re

PRECISION_WORDS = (
    ("INT8", re.compile(r"\bint8\b", re.IGNORECASE)),
    ("FP16", re.compile(r"\b(fp16|half)\b", re.IGNORECASE)),
    ("FP32", re.compile(r"\b(fp32|float)\b", re.IGNORECASE)),
)
NVM_COPY = re.compile(r"\b(to|from) nvm\b", re.IGNORECASE)


def tensor_precision(tensor):
    """Gives back "INT8", "FP16", "FP32", "other" or None for one inspector tensor entry."""
    if not isinstance(tensor, dict):
        return None
    text = str(tensor.get("Format/Datatype", ""))
    if not text:
        return None
    for name, pattern in PRECISION_WORDS:
        if pattern.search(text):
            return name
    return "other"


def layer_precision(layer):
    """Gives back the precision of a layer: that of its first input, else its first output, else None."""
    if not isinstance(layer, dict):
        return None
    for key in ("Inputs", "Outputs"):
        tensors = layer.get(key) or []
        if tensors:
            found = tensor_precision(tensors[0])
            if found is not None:
                return found
    return None


def _name(layer):
    return str(layer.get("Name", "")) if isinstance(layer, dict) else str(layer)


def _is_dla(layer, engine_has_nvm):
    if isinstance(layer, dict):
        kinds = " ".join(str(layer.get(k, "")) for k in ("LayerType", "ParameterType"))
        if re.search(r"\bdla\b", kinds, re.IGNORECASE):
            return True
    return engine_has_nvm and "ForeignNode" in _name(layer)


def summarise(information):
    """Gives back {"layers", "precision": {INT8, FP16, FP32, other, unknown}, "dla", "gpu", "detail", ...}.

    `information` is the inspector's JSON text (or the parsed dict). "dla" counts compute layers placed on the
    DLA; the "to nvm"/"from nvm" copies around them are counted as GPU-side reformats, not as DLA work.
    """
    data = json.loads(information) if isinstance(information, str) else information
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    has_nvm = any(NVM_COPY.search(_name(layer)) for layer in layers)
    counts = {"INT8": 0, "FP16": 0, "FP32": 0, "other": 0, "unknown": 0}
    dla = 0
    for layer in layers:
        precision = layer_precision(layer)
        counts[precision or "unknown"] += 1
        dla += bool(_is_dla(layer, has_nvm))
    detailed = any(isinstance(layer, dict) and layer.get("Inputs") is not None for layer in layers)
    return {
        "layers": len(layers),
        "precision": counts,
        "dla": dla,
        "gpu": len(layers) - dla,
        "detail": "detailed" if detailed else "names only",
        # A ForeignNode the rules above could not place (no DLA type, no nvm copies) may be DLA work in a
        # format this reader does not know, or a GPU (Myelin) subgraph: then "no DLA layer" is not certain.
        "dla_uncertain": dla == 0 and any("ForeignNode" in _name(layer) for layer in layers),
    }
