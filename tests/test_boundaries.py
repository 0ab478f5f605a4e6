"""Package boundaries (ARCHITECTURE.md), checked in a fresh interpreter."""

import subprocess
import sys


def _modules_after_import(pkg: str) -> set[str]:
    code = f"import sys, {pkg}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_quant_imports_no_ray_mlflow_or_devices():
    mods = _modules_after_import("quant")
    assert not mods & {"ray", "mlflow", "devicelab", "farm", "adbutils", "qai_hub", "onnxruntime"}


def test_devicelab_imports_no_quant_ray_or_mlflow():
    assert not _modules_after_import("devicelab") & {"quant", "farm", "ray", "mlflow"}


def test_reports_imports_neither_quant_nor_devicelab():
    assert not _modules_after_import("reports") & {"quant", "devicelab", "ray", "farm"}
