"""The distribution: name, single-sourced version, typed marker, public API."""

import importlib.metadata
from pathlib import Path

import dft


def test_version_is_single_sourced():
    assert dft.__version__ == importlib.metadata.version("dft-loss")


def test_typed_marker_and_assets_ship_with_the_package():
    root = Path(dft.__file__).parent
    assert (root / "py.typed").is_file()
    assert (root / "assets" / "arithmetic_train.jsonl").is_file()


def test_public_names_resolve():
    for name in dft.__all__:
        assert getattr(dft, name) is not None, name


def test_import_is_light():
    """``import dft`` (and the bare ``dft`` command's module) load torch only: no dynamo, transformers,
    datasets, accelerate or matplotlib until a feature needs them (start-up was 3-4 s, now torch's own)."""
    import subprocess
    import sys

    heavy = ["torch._dynamo", "transformers", "datasets", "accelerate", "matplotlib"]
    code = f"import sys, dft, dft.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
