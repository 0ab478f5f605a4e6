"""devicelab: compiles export folders for Snapdragon NPUs and measures them on devices.

* ``exported``: the export-folder contract (written by ``quant.export``; read here without importing quant);
* ``compile``: QNN context binaries (onnxruntime-qnn's HTP compiler, or the user's QNN SDK);
* ``runtime``: an export's logits on onnxruntime's CPU or the QNN HTP emulator (accuracy as deployed);
* ``protocol``, ``backends/`` (host, qnn-sim, adb, aihub), ``inventory``, ``pool``, ``stats``, ``timing``:
  the device pool and the measurement protocol (docs/devices.md);
* phones: ``android`` (adb shell, files, battery, storage), ``qnn_sdk`` (the SDK's files, versions,
  qnn-net-run's command, profile parsers), ``net_inputs`` (raw inputs and input lists from export.json),
  ``power`` (the fuel gauge, energy over the execute phase), ``genie``, ``device_eval`` (the phone's
  logits scored against onnxruntime CPU), ``preflight`` (``farm devices --check``);
* ``qdq``: an export's float graph (QDQ folded), what AI Hub and the QNN converter take beside encodings.

Imports neither quant, farm, Ray nor MLflow (tests/test_boundaries.py).
"""
