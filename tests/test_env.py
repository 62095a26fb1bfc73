"""HPTRANSFER_* on/off variables: one parser (hptransfer/_env.py) for setup.py and the run time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hptransfer import _env

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value", ["1", "true", "True", "TRUE", "yes", "on", " On "])
def test_on_values(monkeypatch, value):
    monkeypatch.setenv("HPTRANSFER_TEST_FLAG", value)
    assert _env.flag("HPTRANSFER_TEST_FLAG") is True


@pytest.mark.parametrize("value", ["", "0", "false", "False", "no", "off", "OFF", " 0 "])
def test_off_values(monkeypatch, value):
    monkeypatch.setenv("HPTRANSFER_TEST_FLAG", value)
    assert _env.flag("HPTRANSFER_TEST_FLAG", default=True) is False


def test_unset_gives_the_default(monkeypatch):
    monkeypatch.delenv("HPTRANSFER_TEST_FLAG", raising=False)
    assert _env.flag("HPTRANSFER_TEST_FLAG") is False
    assert _env.flag("HPTRANSFER_TEST_FLAG", default=True) is True


@pytest.mark.parametrize("value", ["2", "y", "enable", "-1", "truee"])
def test_other_values_are_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("HPTRANSFER_TEST_FLAG", value)
    with pytest.raises(ValueError, match=rf"HPTRANSFER_TEST_FLAG='{value}'.*1, true, yes, on"):
        _env.flag("HPTRANSFER_TEST_FLAG")


def test_no_ext_false_means_use_the_extension(monkeypatch):
    """HPTRANSFER_NO_EXT=false used to build the extension and then disable it at run time."""
    from hptransfer.ops import _dispatch

    for value, disabled in (("false", False), ("0", False), ("off", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("HPTRANSFER_NO_EXT", value)
        _dispatch._load_extension.cache_clear()
        try:
            _, reason = _dispatch._load_extension()
        finally:
            _dispatch._load_extension.cache_clear()  # the next caller reads the real environment again
        assert (reason == "disabled by HPTRANSFER_NO_EXT") == disabled, (value, reason)


@pytest.mark.parametrize("value", ["1", "true", "On", "YES", "y", "Y", "0", "false", "", "2", "t"])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """TRITON_INTERPRET is Triton's variable: the dispatch must agree with Triton on whether it is on."""
    from hptransfer.ops import _dispatch

    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    triton_says = bool(knobs.runtime.interpret)
    assert _dispatch.triton_interpret() == triton_says, value
    monkeypatch.setitem(sys.modules, "triton", None)  # no Triton: our own reading
    assert _dispatch.triton_interpret() == triton_says, value


_SETUP_PROBE = """
import importlib.util, json, sys
import setuptools
calls = []
setuptools.setup = lambda **kw: calls.append(kw)
spec = importlib.util.spec_from_file_location("_hptransfer_setup", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert "hptransfer" not in sys.modules, "setup.py imported the package"
print(json.dumps([e.name for e in calls[0]["ext_modules"]]))
"""


def _setup_extensions(no_ext: str) -> subprocess.CompletedProcess:
    """The extensions setup.py asks setuptools to build under HPTRANSFER_NO_EXT=``no_ext``: setup.py run by
    path in a fresh interpreter, setup() only recording its arguments (nothing is compiled)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HPTRANSFER_FORCE_CUDA", "PYTHONPATH")}
    env["HPTRANSFER_NO_EXT"] = no_ext
    return subprocess.run([sys.executable, "-c", _SETUP_PROBE, str(REPO / "setup.py")], env=env, cwd="/",
                          capture_output=True, text=True, timeout=300)


def test_setup_py_reads_flags_with_the_same_rule():
    built = _setup_extensions("false")
    assert built.returncode == 0, built.stderr[-2000:]
    assert json.loads(built.stdout.splitlines()[-1]) == ["hptransfer._C"]  # built, and used (test above)
    skipped = _setup_extensions("on")
    assert skipped.returncode == 0 and json.loads(skipped.stdout.splitlines()[-1]) == [], skipped.stderr[-2000:]
    bad = _setup_extensions("maybe")
    assert bad.returncode != 0 and "HPTRANSFER_NO_EXT='maybe'" in bad.stderr, bad.stderr[-2000:]


def test_a_bad_flag_value_is_one_error_line_from_the_cli(monkeypatch, capsys):
    from hptransfer.cli import main

    monkeypatch.setenv("HPTRANSFER_DEBUG", "maybe")
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: environment variable HPTRANSFER_DEBUG='maybe'")
