"""ONNX Runtime vs TensorRT on the real probe images, through Polygraphy (`check.py --compare`).

Polygraphy's Comparator runs both runners on the same feeds and compares every output (edge.md §4.4:
`polygraphy run --onnxrt --trt`, with real inputs rather than random ones, which exaggerate INT8 error). The
feeds here are the bundle's clean and triggered probe images in batches the engine takes. Where polygraphy is
not importable the result is a skip with the install line. For a Q/DQ model ONNX Runtime runs fake-quantised
INT8, the right reference for the INT8 engine: expect closeness within INT8 noise, not equality.
Needs numpy, polygraphy, onnxruntime and tensorrt; Python 3.6 syntax.
"""

import numpy as np

# atol = rtol per precision: FP32 (TF32 off) close to exact; FP16 as edge.md §4.4; INT8 only a loose bound,
# the verdict that matters there is the top-1 agreement and the ACC/ASR deltas.
TOLERANCES = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-1}
SKIP = "polygraphy is not importable ({}): pip3 install polygraphy to compare ONNX Runtime with TensorRT"


def import_polygraphy():
    """Gives back polygraphy's (OnnxrtRunner, SessionFromOnnx, TrtRunner, Comparator, CompareFunc)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    return OnnxrtRunner, SessionFromOnnx, TrtRunner, Comparator, CompareFunc


def probe_feeds(probes, input_name, low, high):
    """Gives back (feed dicts, real rows per feed) over every probe image set, in batches of at most `high`
    images, a short last batch padded with copies of its last image up to `low` (a static DLA batch)."""
    feeds, real = [], []
    for images in [probes["images"]] + list(probes["triggered"]):
        for start in range(0, len(images), high):
            chunk = images[start : start + high]
            real.append(len(chunk))
            if len(chunk) < low:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], low - len(chunk), axis=0)])
            feeds.append({input_name: np.ascontiguousarray(chunk, dtype=np.float32)})
    return feeds, real


def _outputs(results, runner_name, output_name, real):
    """Gives back one runner's outputs over all feeds, padded rows dropped."""
    return np.concatenate(
        [
            np.asarray(iteration[output_name], dtype=np.float32)[:rows]
            for iteration, rows in zip(results[runner_name], real)
        ]
    )


def polygraphy_parity(onnx_path, engine, input_name, output_name, probes, precision, batch_range):
    """Gives back {"tool", "passed", "max_abs_diff", "top1_agreement", ...} or {"skipped": why}."""
    try:
        OnnxrtRunner, SessionFromOnnx, TrtRunner, Comparator, CompareFunc = import_polygraphy()
    except ImportError as exc:
        return {"skipped": SKIP.format(exc)}
    low, _, high = batch_range
    feeds, real = probe_feeds(probes, input_name, low, max(low, min(high, 64)))
    try:
        session = SessionFromOnnx(onnx_path, providers=["cpu"])
    except TypeError:  # polygraphy before 0.38 has no providers argument
        session = SessionFromOnnx(onnx_path)
    runners = [OnnxrtRunner(session), TrtRunner(engine)]
    results = Comparator.run(runners, data_loader=feeds)
    tolerance = TOLERANCES[precision]
    verdict = Comparator.compare_accuracy(
        results, compare_func=CompareFunc.simple(atol=tolerance, rtol=tolerance)
    )
    reference = _outputs(results, runners[0].name, output_name, real)
    board = _outputs(results, runners[1].name, output_name, real)
    return {
        "tool": "polygraphy",
        "onnx": onnx_path.replace("\\", "/").split("/")[-1],
        "feeds": len(feeds),
        "images": int(len(reference)),
        "atol": tolerance,
        "rtol": tolerance,
        "passed": bool(verdict),
        "max_abs_diff": float(np.max(np.abs(reference - board))) if len(reference) else 0.0,
        "top1_agreement": float(np.mean(reference.argmax(1) == board.argmax(1))) if len(reference) else 1.0,
    }
