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
