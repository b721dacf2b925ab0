"""Device placement, checked on a CPU: the whole run on a stand-in for the GPU.

The first GPU run died on byte tables left on the CPU and indexed with tokens on the GPU; nothing on
a CPU-only machine caught it, because there every tensor is on the one device. Here a second device
is emulated: tensors "on the device" are real CPU tensors wrapped in a subclass that reports the
`meta` device, and a dispatch mode runs every operation on the wrapped data while enforcing CUDA's
rules: an operation may not mix tensors of the device with tensors of the host (0-dim host tensors
excepted, as CUDA accepts CPU scalars; a device tensor may be indexed with host indices, not the
reverse), `.to(device)` moves, `.cpu()` comes back, a random generator must live on the device of
the tensor it fills. The code under test sees `rt.device == meta` and no CUDA, so these tests cover
where tensors are created and moved, not CUDA kernels; the values are the CPU's, so results can be
compared with a plain CPU run.
"""

import contextlib
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import train_gpt as T
from conftest import Recorder, randomize, synthetic_stream, tiny_args, toy_tables

DEVICE = torch.device("meta")
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
MOVE_OPS = {"copy_", "_to_copy", "copy"}


class DeviceMixing(RuntimeError):
    """What CUDA raises when an operation meets tensors of two devices."""


class OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on the stand-in device."""

    @staticmethod
    def __new__(cls, elem):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                dtype=elem.dtype, layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        t.elem = elem
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self):  # CUDA tensors copy out (a host sync); the subclass needs it spelled out
        return self.elem.tolist()

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"{func} reached a device tensor outside the emulation")


class DeviceGenerator(torch.Generator):
    """torch.Generator(device=...) that accepts the stand-in device: a CPU generator, registered as on it
    (operations see the C++ generator, known by its address)."""

    on_device: dict = {}  # _cdata -> the generator (kept alive, so that its address is not reused)

    def __new__(cls, device="cpu"):
        remote = torch.device(device).type == DEVICE.type
        g = super().__new__(cls, device="cpu" if remote else device)
        if remote:
            cls.on_device[g._cdata] = g
        return g

    def __init__(self, device="cpu"):
        pass


class EmulatedDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        on_device, on_host, on_meta = [], [], []

        def unwrap(t):
            if isinstance(t, OnDevice):
                on_device.append(t)
                return t.elem
            if isinstance(t, torch.Tensor):
                (on_meta if t.device.type == DEVICE.type else on_host).append(t)
            return t

        args_, kwargs_ = tree_map(unwrap, (args, kwargs))
        if on_meta:  # real meta tensors (shapes only, as the size check builds the model): theirs to run
            assert not on_device, f"{func}: a tensor of the stand-in device with no data (made outside the emulation)"
            return func(*args, **kwargs)
        target = kwargs.get("device")
        to_device = bool(on_device) if target is None else torch.device(target).type == DEVICE.type
        if target is not None:
            kwargs_["device"] = torch.device("cpu")
        if name not in MOVE_OPS:
            mixed = bool(on_device) and any(t.dim() > 0 for t in on_host)
            if name in INDEX_OPS:  # a device tensor takes host indices (not host values), as on CUDA; a host tensor no device ones
                values = [args[2]] if len(args) > 2 and isinstance(args[2], torch.Tensor) else []
                mixed = bool(on_device) and (not isinstance(args[0], OnDevice) or any(not isinstance(v, OnDevice) and v.dim() > 0 for v in values))
            if mixed:
                raise DeviceMixing(f"{func}: a tensor on the device meets a tensor on the host")
        generator = kwargs.get("generator")
        if generator is not None and (generator._cdata in DeviceGenerator.on_device) != to_device:
            raise DeviceMixing(f"{func}: a generator of the {'host' if to_device else 'device'} for a tensor on the {'device' if to_device else 'host'}")
        out = func(*args_, **kwargs_)
        if name == "_local_scalar_dense" or not to_device:
            return out
        return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) else t, out)


@contextlib.contextmanager
def emulated_device(monkeypatch):
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):  # torch.tensor builds on the host, then moves
        t = real_tensor(data, *args, **kwargs)
        return t if device is None else t.to(device)

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch, "Generator", DeviceGenerator)
    with EmulatedDevice():
        yield T.Runtime(device=DEVICE)


@pytest.fixture
def device(monkeypatch):
    with emulated_device(monkeypatch) as rt:
        yield rt


def on_device(t) -> bool:
    return isinstance(t, OnDevice)


# ----------------------------------------------------------------------------- the emulation itself


def test_the_emulation_raises_where_cuda_raises(device):
    tokens = torch.arange(2, 12).to(device.device)
    table = torch.arange(64)
    with pytest.raises(DeviceMixing):
        table[tokens]  # the bug of the first GPU run
    with pytest.raises(DeviceMixing):
        tokens + torch.ones(10, dtype=torch.long)
    with pytest.raises(DeviceMixing):
        torch.equal(tokens, torch.arange(2, 12))
    with pytest.raises(DeviceMixing):
        torch.empty(3, device=device.device).uniform_(generator=torch.Generator(device="cpu"))
    assert on_device(table.to(device.device)[tokens]) and on_device(tokens[torch.tensor([0, 1])])
    assert on_device(tokens + torch.tensor(1)) and int(tokens.sum()) == 65 and tokens.tolist()[0] == 2
    assert not on_device(tokens.cpu()) and torch.equal(tokens.cpu(), torch.arange(2, 12))
    assert on_device(torch.zeros(2, device=device.device)) and on_device(torch.tensor([1, 2], device=device.device))


# ----------------------------------------------------------------------------- bytes, ledgers, scoring paths


def test_bytes_of_device_tokens_from_host_tables(device):
    """The first GPU run's crash: validation tokens on the GPU, byte tables on the CPU."""
    tables = toy_tables(64)
    tokens = torch.from_numpy(synthetic_stream(6).astype(np.int64))
    expected = T.stream_target_bytes(tokens, tables)
    got = T.stream_target_bytes(tokens.to(device.device), tables)
    assert on_device(got) and torch.equal(got.cpu(), expected)
    sidecar = T.ByteTables(tables.base_bytes, tables.has_leading_space, tables.is_boundary, tokens.to(device.device), torch.arange(tokens.numel(), dtype=torch.int32).to(device.device))
    assert torch.equal(T.stream_target_bytes(tokens.to(device.device), sidecar).cpu(), torch.arange(1, tokens.numel(), dtype=torch.int32))


def tiny_on(rt, seed=0, **overrides):
    torch.manual_seed(seed)
    model = randomize(T.GPT(T.ModelConfig.from_args(tiny_args(**overrides))), seed)
    return model.to(rt.device)


@pytest.mark.parametrize("path", ["standard", "sliding_window", "ttt"])
def test_every_scoring_path_on_the_device(device, path):
    """score_path with the model and tokens on the device and host byte tables, with the audit's ledger
    (distributions kept), phased TTT with a global SGD phase: the same scores as on the CPU."""
    args = tiny_args(TTT_LR=0.05, TTT_PHASE_DOCS="2,4", EVAL_STRIDE=8)
    tables = toy_tables(64)
    tokens = torch.from_numpy(synthetic_stream(8, seed=3).astype(np.int64))
    results = []
    for rt in (T.Runtime(), device):
        model = tiny_on(rt)
        model.requires_grad_(False)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        toks = tokens.to(rt.device)
        ledger = T.ScoreLedger(toks, tables, audit=True, watch=(5, 40))
        T.score_path(path, model, weights, toks, ledger, args, rt)
        ledger.merge(rt)
        results.append((ledger.result(), ledger.nll.cpu()))
        if rt is device:
            assert on_device(ledger.nll) and ledger.without_distribution == 0
    (cpu, cpu_nll), (dev, dev_nll) = results
    # the same arithmetic, though not always the same kernels (SDPA picks its CPU kernel by the device it is told)
    assert torch.allclose(cpu_nll, dev_nll, rtol=1e-4, atol=1e-4) and math.isclose(cpu.val_bpb, dev.val_bpb, rel_tol=1e-5)


# ----------------------------------------------------------------------------- the whole run


def write_run_data(folder):
    for split, docs in (("train", 300), ("val", 12)):
        T.write_data_shard(folder / f"fineweb_{split}_000000.bin", synthetic_stream(docs, seed=len(split)).astype(np.uint16))


def probes_on_the_device(streams, jobs, watch, args, rt, tables, artifact, code):
    """The audit's fresh process, done here (a subprocess cannot share the stand-in device): the
    artifact loaded onto the device and the probe jobs scored there, as score_probe_file does."""
    model = T.load_model_from_artifact(artifact, rt.device)
    model.requires_grad_(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(on_device(s) for s in streams)
    found = T.score_probe_jobs(T.evaluation_paths(args)[-1], model, weights, streams, jobs, watch, args, rt, tables)
    return found["results"], found["weights_sha256"], None


def test_the_whole_run_on_the_device(device, tmp_path, monkeypatch):
    """run(): training (the loader, Muon, EMA, a validation pass, calibration inside the budget), GPTQ on
    Hessians from the device, the artifact, its reload onto the device, the paths and the audit of the
    scored one, all with the model and data on the device; the log ends with a valid submission."""
    write_run_data(tmp_path)
    monkeypatch.setattr(T, "load_tokenizer_tables", lambda path, vocab: toy_tables(vocab))
    monkeypatch.setattr(T, "tokenizer_mismatch", lambda data, tokenizer: None)
    monkeypatch.setattr(T, "is_caseops_tokenizer", lambda path: False)
    args = tiny_args(DATA_PATH=str(tmp_path), TOKENIZER_PATH=str(tmp_path / "none.model"), LOG_DIR=str(tmp_path / "logs"), ITERATIONS=4,
                     TTT_LR=0.05, TTT_PHASE_DOCS="4", EVAL_STRIDE=0, EVAL_AUDIT_TOKENS=128, CODE_MINIFY=0, ARTIFACT_COMPRESSOR="lzma",
                     MAX_WALLCLOCK_SECONDS=60, GPTQ_RESERVE_SECONDS="auto", VAL_LOSS_EVERY=4)
    monkeypatch.setattr(T, "run_probe_process", probes_on_the_device)
    log = Recorder()
    valid = T.run(args, device, "device_run", log)
    text = "\n".join(log.lines)
    assert valid, text[-3000:]
    for line in ("stage:train done", "gptq_calibration source:train", "stage:compress done", "final_int6_lzma_ttt_phased", "eval_audit path:ttt verdict:PASS"):
        assert line in text, line


def test_the_crash_of_the_first_gpu_run_is_caught(device, monkeypatch):
    """The mutation the issue names: target_bytes indexing host tables with device tokens fails here."""
    tables = toy_tables(64)
    tokens = torch.from_numpy(synthetic_stream(4).astype(np.int64)).to(device.device)

    def host_tables(prev, tgt, tables):
        extra = tables.has_leading_space[tgt] & ~tables.is_boundary[prev]
        return tables.base_bytes[tgt].to(torch.int32) + extra.to(torch.int32)

    monkeypatch.setattr(T, "target_bytes", host_tables)
    with pytest.raises(DeviceMixing):
        T.stream_target_bytes(tokens, tables)
