"""The shipped train_gpt.py: a self-extracting compressed copy of the source that runs as the module
itself, whose exact size on disk is the counted code size, and which the packager ships byte for byte."""

import hashlib
import importlib.util
import json
import os
import random
import runpy
import subprocess
import sys

import pytest
import torch

import train_gpt as T
from conftest import REPO, tiny_args, tiny_model, toy_tables
from test_tools import SEEDS, SOURCE, make_submission, our_log, package

HAS_MINIFIER = importlib.util.find_spec("python_minifier") is not None
MINIFY = [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_MINIFIER, reason="python-minifier is not installed"))]

PROBE_SOURCE = '''"""A docstring the minifier may drop."""
from pathlib import Path
import random as _random

NOISE = {noise!r}


def where():
    """Where this module thinks it lives."""
    return Path(__file__).name, __name__


if __name__ == "__main__":
    print("main", *where(), len(NOISE))
'''


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def same_settings(module, args):
    """`args` as the Hyperparameters of another copy of the script."""
    return module.Hyperparameters({k: str(int(v) if isinstance(v, bool) else v) for k, v in args.as_dict().items()})


def test_the_latin1_literal_carries_every_byte_value(tmp_path):
    rng = random.Random(0)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(30000))  # compresses to ~every byte value
    source = PROBE_SOURCE.format(noise=noise).encode()
    wrapper = T.shipped_code(source, minify=False)
    import brotli

    packed = brotli.compress(source, quality=11, lgwin=24)
    assert set(packed) >= {0, ord("\n"), ord("\r"), ord("'"), ord("\\")}, "the payload must hold the bytes that need escapes"
    assert len(wrapper) < len(packed) * 1.05 + 200, "a Latin-1 literal costs a few escapes, not base85's 25 %"
    path = tmp_path / "shipped.py"
    path.write_bytes(wrapper)
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["main", "shipped.py", "__main__", "30000"], done.stderr
    module = load_module(path, "probe_shipped")
    assert module.where() == ("shipped.py", "probe_shipped"), "__file__ and __name__ are the wrapper's, as for the source itself"
    assert module.SHIPPED_SOURCE == source


@pytest.mark.parametrize("minify", MINIFY)
def test_the_shipped_wrapper_imports_and_evaluates_an_artifact(tmp_path, minify):
    source = (REPO / "train_gpt.py").read_bytes()
    path = tmp_path / "train_gpt.py"
    size = T.write_shipped_code(path, source, minify)
    assert size == os.path.getsize(path) and size < len(source) / (4 if minify else 3)
    assert path.read_bytes() == T.shipped_code(source, minify), "the file is computed deterministically"
    shipped = load_module(path, f"train_gpt_shipped_{int(minify)}")
    assert (shipped.running_source() == source) != minify, "the wrapper runs the source, minified or not"
    # the shipped module writes an artifact and the script's module reads it, and the other way round
    model = tiny_model(seed=11)
    args = tiny_args(QUANT_FLOAT_MAX_NUMEL=0, GPTQ_ENABLED=0, ARTIFACT_COMPRESSOR="zstd")
    ours, theirs = tmp_path / "ours.pgz", tmp_path / "theirs.pgz"
    T.write_artifact(T.quantize_state_dict(model.state_dict(), args, None), model.cfg, args, ours, size, lambda line: None)
    shipped_args = same_settings(shipped, args)
    cfg = shipped.ModelConfig(**model.cfg.__dict__)
    shipped.write_artifact(shipped.quantize_state_dict(model.state_dict(), shipped_args, None), cfg, shipped_args, theirs, size, lambda line: None)
    assert ours.read_bytes() == theirs.read_bytes()
    tokens = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(3))
    tokens[0] = T.BOS_ID
    scores = []
    for module, artifact in ((T, theirs), (shipped, ours)):
        rebuilt = module.load_model_from_artifact(artifact, torch.device("cpu"))
        tables = module.ByteTables(*vars(toy_tables()).values())
        scores.append(module.evaluate_standard(rebuilt, tokens, tables, same_settings(module, args), module.Runtime()).val_bpb)
    assert scores[0] == scores[1] and scores[0] > 0


def test_a_wrapper_ships_itself(tmp_path):
    source = (REPO / "train_gpt.py").read_bytes()
    path = tmp_path / "first.py"
    T.write_shipped_code(path, source, minify=False)
    shipped = load_module(path, "train_gpt_shipped_self")
    again = tmp_path / "second.py"
    assert shipped.write_shipped_code(again, shipped.running_source(), True) == os.path.getsize(path)
    assert again.read_bytes() == path.read_bytes(), "running from a wrapper, the file shipped is that wrapper, not a re-compression"


def test_missing_packages_are_named_before_training(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("python_minifier", "zpaq") else real(name, *a))
    with pytest.raises(T.SettingsError, match=r"CODE_MINIFY=1 \(or set CODE_MINIFY=0\) needs the python_minifier module: pip install python-minifier"):
        T.check_artifact_packages(tiny_args())
    with pytest.raises(T.SettingsError, match="ARTIFACT_COMPRESSOR=zpaq needs the zpaq module: pip install zpaq"):
        T.check_artifact_packages(tiny_args(CODE_MINIFY=0, ARTIFACT_COMPRESSOR="zpaq"))
    T.check_artifact_packages(tiny_args(CODE_MINIFY=0, ARTIFACT_COMPRESSOR="auto"))  # auto uses what is installed


# ----------------------------------------------------------------------------- the packager ships exactly that file


def logs_with_a_wrapper(tmp_path, wrapper: bytes):
    script = tmp_path / "train_gpt.py"
    script.write_text(SOURCE)
    sha = hashlib.sha256(wrapper).hexdigest()
    logs = []
    for seed in SEEDS:
        path = tmp_path / "logs" / f"run_seed{seed}.txt"
        path.parent.mkdir(exist_ok=True)
        (path.parent / f"run_seed{seed}.train_gpt.py").write_bytes(wrapper)
        path.write_text(our_log(seed) + f"shipped_code file:run_seed{seed}.train_gpt.py bytes:{len(wrapper)} sha256:{sha}\n")
        logs.append(path)
    return script, logs


def test_make_submission_ships_the_wrapper_the_runs_wrote(tmp_path):
    wrapper = T.shipped_code(SOURCE.encode(), minify=False)
    script, logs = logs_with_a_wrapper(tmp_path, wrapper)
    assert package(tmp_path, script, logs) == 0
    folder = tmp_path / "out" / "track_10min_16mb" / "2025-01-02_Test_Run"
    assert (folder / "train_gpt.py").read_bytes() == wrapper
    sub = json.loads((folder / "submission.json").read_text())
    assert (sub["bytes_code"], sub["bytes_total"]) == (len(wrapper), 15_500_000 + len(wrapper))
    assert len(runpy.run_path(str(folder / "train_gpt.py"), run_name="not_main")["SETTINGS"]) == 7


@pytest.mark.parametrize("damage", ["one_byte", "missing", "wrap_asked"])
def test_make_submission_refuses_a_wrapper_whose_bytes_differ(tmp_path, capsys, damage):
    wrapper = T.shipped_code(SOURCE.encode(), minify=False)
    script, logs = logs_with_a_wrapper(tmp_path, wrapper)
    first = logs[0].parent / f"run_seed{SEEDS[0]}.train_gpt.py"
    extra, words = (), ()
    if damage == "one_byte":  # same size, other bytes
        data = bytearray(wrapper)
        data[len(data) // 2] ^= 0x01
        first.write_bytes(bytes(data))
        words = ("ship the file the run wrote", str(first))
    elif damage == "missing":
        first.unlink()
        words = ("cannot read", str(first))
    else:
        extra, words = ("--wrap",), ("drop --wrap",)
    assert package(tmp_path, script, logs, *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists(), "a refusal creates nothing"


def test_make_submission_refuses_runs_that_wrote_different_wrappers(tmp_path, capsys):
    script, logs = logs_with_a_wrapper(tmp_path, T.shipped_code(SOURCE.encode(), minify=False))
    other = T.shipped_code(SOURCE.encode() + b"# other\n", minify=False)
    (logs[1].parent / f"run_seed{SEEDS[1]}.train_gpt.py").write_bytes(other)
    text = logs[1].read_text().rsplit("shipped_code", 1)[0]
    logs[1].write_text(text + f"shipped_code file:run_seed{SEEDS[1]}.train_gpt.py bytes:{len(other)} sha256:{hashlib.sha256(other).hexdigest()}\n")
    assert package(tmp_path, script, logs) == 1
    assert "did not all write the same shipped train_gpt.py" in capsys.readouterr().err
    assert make_submission.shipped_code_file([make_submission.logparse.parse_log(str(logs[0]))]) is not None
