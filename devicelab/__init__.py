"""devicelab: compiles export folders for Snapdragon NPUs and measures them on devices.

* ``exported``: the export-folder contract (written by ``quant.export``; read here without importing quant);
* ``compile``: QNN context binaries (onnxruntime-qnn's HTP compiler, or the user's QNN SDK);
* ``runtime``: an export's logits on onnxruntime's CPU or the QNN HTP emulator (accuracy as deployed);
* ``protocol``, ``backends/`` (host, qnn-sim, adb, aihub), ``inventory``, ``pool``, ``stats``, ``timing``:
  the device pool and the measurement protocol (docs/devices.md).

Imports neither quant, farm, Ray nor MLflow (tests/test_boundaries.py).
"""
