"""Deploy: the student as the board runs it, and what it costs there.

- `onnx`: FP32 ONNX export (exporter and opset per target profile) and ONNX Runtime sessions.
- `int8`: INT8 Q/DQ quantisation with TensorRT's rules, calibrated on clean training images.
- `host_check`: ACC, ASR, parity and latency per precision on this host.
- `bundle`: the export job (`rkdtool export`): the bundle folder, written atomically.
- `timing`, `bench`: latency timers and the `rkdtool bench` benchmark.

The device runtime copied into every bundle lives apart, in `export/`, and imports nothing from here.
"""
