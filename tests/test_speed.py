"""The speed work's logic, on CPU: per-epoch non-finite check, no host read inside a training
step, bf16 autocast, the evaluation helper, channels-last models, the dataset cache,
deterministic mode without torch._inductor, and the bit-for-bit shortcuts (pooling before an
in-place ReLU, clipping, SGD's weight decay)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mhpfl.config import RunConfig
from mhpfl.datasets import Split
from mhpfl.errors import NonFiniteLoss, UserError
from mhpfl.models import build_model
from tests._engine_util import EVERY_METHOD
from tests.conftest import needs_fmnist, synthetic_client


def test_non_finite_loss_stops_after_the_epoch_with_client_and_round():
    """No host sync per step: the loss is checked once per epoch, the error still names the
    method, client and round, and the next epoch never starts."""
    c = synthetic_client("standalone", cid=3, n=40)
    c.start_update(7, "train")
    calls = []

    def loss_fn(x, y):
        calls.append(1)
        loss = F.cross_entropy(c.model(x), y)
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.raises(NonFiniteLoss, match=r"standalone: loss became nan on client 3 in round 7") as e:
        c.fit(c.model.parameters(), loss_fn, epochs=3, batch_size=8)
    assert (e.value.client, e.value.round) == (3, 7)
    assert len(calls) == 5  # the whole first epoch (40 / 8 batches), not the next two


def test_finite_fit_returns_the_mean_loss():
    c = synthetic_client("standalone", n=16)
    seen = []

    def loss_fn(x, y):
        loss = F.cross_entropy(c.model(x), y)
        seen.append(float(loss.detach()))
        return loss

    mean = c.fit(c.model.parameters(), loss_fn, epochs=2, batch_size=8)
    assert mean == pytest.approx(sum(seen) / len(seen), rel=1e-6)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_autocasts_forward_passes_only(precision, dtype):
    c = synthetic_client("standalone", n=8)
    c.cfg.precision = precision
    dtypes = []

    def loss_fn(x, y):
        out = c.model(x)
        dtypes.append(out.dtype)
        return F.cross_entropy(out, y)

    c.fit(c.model.parameters(), loss_fn, batch_size=8)
    assert dtypes == [dtype]
    assert all(p.dtype == torch.float32 for p in c.model.parameters())  # fp32 master weights
    assert c.infer(c.model, c.data.train).dtype == torch.float32


def test_every_method_is_every_built_in_method():
    """The per-method tests (here, test_gpu.py) cover a method added later too."""
    from mhpfl.methods import BUILTIN

    assert sorted(EVERY_METHOD) == sorted(BUILTIN)


@needs_fmnist
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_runs_in_bf16(method, tiny_cfg, tmp_path):
    """--precision bf16 end to end: the methods that accumulate per-class sums of what the model
    outputs (FD's logits, FedProto's representations) got bf16 tensors into float32 sums."""
    from mhpfl.engine import run

    cfg = tiny_cfg(method, rounds=1, precision="bf16", zoo="homo" if method == "fedavg" else "hetero")
    s = run(cfg, out=tmp_path, progress=False)
    assert s["config"]["precision"] == "bf16" and 0 < s["selected_mean_acc"] <= 100


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="unknown precision 'fp16'; use fp32 or bf16"):
        RunConfig(method="standalone", precision="fp16", download=False).validate()
    assert RunConfig(method="standalone").to_dict()["precision"] == "fp32"  # recorded in summaries


def test_accuracy_counts_in_inference_mode_over_all_batches():
    c = synthetic_client("standalone", n=12)
    x = torch.randn(600, 1, 28, 28)
    y = torch.arange(600) % 10
    split = Split(x, y)
    modes = []

    def predict(xb):
        modes.append((torch.is_inference_mode_enabled(), c.model.training))
        return F.one_hot(torch.where(torch.arange(len(xb)) % 2 == 0, 3, 4), 10).float()

    c.model.train()
    right = c.correct(predict, split)
    assert right == sum(int(l) == (3 if i % 256 % 2 == 0 else 4) for i, l in enumerate(y))
    assert len(modes) == 3 and all(m == (True, False) for m in modes)  # batches of 256


def test_models_are_channels_last_and_compute_the_same_function():
    m = build_model("cnn1", (3, 32, 32), 10)
    assert m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    ref = build_model("cnn1", (3, 32, 32), 10).to(memory_format=torch.contiguous_format)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)


@needs_fmnist
def test_dataset_cache_is_bitwise_and_survives_corruption(tmp_path, monkeypatch):
    from mhpfl.datasets import loaders

    root = tmp_path / "data"
    if shutil.disk_usage(tmp_path).free < 1 << 30:
        pytest.skip(f"less than 1 GiB free under {tmp_path} for a 220 MB cache")
    monkeypatch.setattr(loaders, "CACHE_FREE_MARGIN", 0)
    loaders.load_dataset.cache_clear()
    first = loaders.load_dataset("fmnist", str(root), False)
    path = loaders.cache_path(root, first.info)
    assert path.exists()
    loaders.load_dataset.cache_clear()
    decode = loaders._decode
    monkeypatch.setattr(loaders, "_decode", lambda *a: pytest.fail("decoded although cached"))
    cached = loaders.load_dataset("fmnist", str(root), False)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, k), getattr(cached, k))
    monkeypatch.setattr(loaders, "_decode", decode)
    path.write_bytes(b"truncated")
    loaders.load_dataset.cache_clear()
    again = loaders.load_dataset("fmnist", str(root), False)
    assert torch.equal(again.test_x, first.test_x)
    loaders.load_dataset.cache_clear()


def _small_dataset():
    from mhpfl.datasets import dataset_info
    from mhpfl.datasets.loaders import TensorDataset

    g = torch.Generator().manual_seed(0)
    return TensorDataset(dataset_info("fmnist"), torch.randn(64, 1, 28, 28, generator=g), torch.arange(64) % 10,
                         torch.randn(16, 1, 28, 28, generator=g), torch.arange(16) % 10)


def test_a_full_disk_skips_the_dataset_cache_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """The cache only saves decoding time: a disk that fills up mid-write (torch.save raises
    RuntimeError, as CI saw) or that would keep less than CACHE_FREE_MARGIN free loads the data
    all the same, writes no cache and leaves no temporary file behind."""
    import collections

    from mhpfl.datasets import loaders

    small = _small_dataset()
    monkeypatch.setattr(loaders, "_decode", lambda *a: small)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(loaders.shutil, "disk_usage", lambda p: usage(1 << 50, 0, 1 << 50))  # room, so it writes
    real_save, partial = torch.save, []

    def save_until_full(obj, f):
        real_save(obj, f)
        partial.append(f)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 982")

    monkeypatch.setattr(loaders.torch, "save", save_until_full)
    loaders.load_dataset.cache_clear()
    assert loaders.load_dataset("fmnist", str(tmp_path), False) is small
    assert len(partial) == 1 and list((tmp_path / ".mhpfl-cache").iterdir()) == []
    monkeypatch.setattr(loaders.torch, "save", real_save)

    need = sum(t.nbytes for t in (small.train_x, small.train_y, small.test_x, small.test_y))
    for free, written in ((need + loaders.CACHE_FREE_MARGIN - 1, False), (need + loaders.CACHE_FREE_MARGIN, True)):
        monkeypatch.setattr(loaders.shutil, "disk_usage", lambda p, free=free: usage(2 * free, free, free))
        loaders.load_dataset.cache_clear()
        assert loaders.load_dataset("fmnist", str(tmp_path), False) is small
        assert loaders.cache_path(tmp_path, small.info).exists() is written
    loaders.load_dataset.cache_clear()


@pytest.mark.parametrize("arch", ["cnn1", "cnn2", "cnn5"])
def test_pooling_before_the_relu_is_bit_for_bit_relu_then_pool(arch):
    """The zoo's forward pass pools, then applies ReLU in place, and pools by elementwise maxima
    when gradients are off: the same logits, representation and gradients, bit for bit, as the
    written order conv -> ReLU -> max_pool2d, in training and in inference. The images have a
    constant background, as Fashion-MNIST's do, so pooling windows hold exact ties (where a
    gradient could be routed differently) and ReLU zeroes whole windows."""
    torch.manual_seed(0)
    m = build_model(arch, (1, 28, 28), 10)

    def written_order(x):
        x = F.max_pool2d(torch.relu(m.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(m.conv2(x)), 2)
        rep = torch.relu(m.fc2(torch.relu(m.fc1(x.flatten(1)))))
        return m.fc3(rep), rep

    x = torch.randn(32, 1, 28, 28) - 1.0
    x[:, :, :10] = x[:, :, :, -9:] = -0.8  # background
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(32) % 10
    grads = []
    for forward in (lambda x: m(x, return_rep=True), written_order):
        m.zero_grad(set_to_none=True)
        logits, rep = forward(x)
        F.cross_entropy(logits, y).backward()
        grads.append([logits.detach(), rep.detach()] + [p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    for memory_format in (torch.channels_last, torch.contiguous_format):
        with torch.inference_mode():
            outs = [f(x.contiguous(memory_format=memory_format)) for f in (lambda x: m(x, return_rep=True), written_order)]
        assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("shape", [(3, 16, 24, 24), (2, 5, 9, 7), (1, 3, 2, 2)])
def test_max_pool2_without_gradients_is_max_pool2d(shape):
    """models.max_pool2 with gradients off: F.max_pool2d(x, 2)'s values (odd sizes floor, ties,
    NaN propagated) and memory format; with gradients on it is max_pool2d itself."""
    from mhpfl.models import max_pool2

    x = torch.randn(*shape).round()  # ties
    x.view(-1)[::7] = float("nan")
    for fmt in (torch.channels_last, torch.contiguous_format):
        xf = x.contiguous(memory_format=fmt)
        with torch.no_grad():
            ours, ref = max_pool2(xf), F.max_pool2d(xf, 2)
        assert torch.equal(ours.nan_to_num(7.5), ref.nan_to_num(7.5)) and ours.isnan().equal(ref.isnan())
        assert ours.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt)
    w = x.nan_to_num(0.0).requires_grad_()
    max_pool2(w).sum().backward()
    assert w.grad.sum() == shape[0] * shape[1] * (shape[2] // 2) * (shape[3] // 2)  # one per window
    assert set(w.grad.unique().tolist()) <= {0.0, 1.0}  # whole gradients, never split between ties


def test_clip_grad_norm_is_torch_bit_for_bit_and_skips_only_a_factor_of_one():
    """lean.clip_grad_norm: torch's clip_grad_norm_ bit for bit when the norm is over the bound
    (gradients scaled), under it (left untouched, as torch's multiplication by 1 leaves them) and
    when a gradient is NaN."""
    from mhpfl.lean import clip_grad_norm

    torch.manual_seed(0)
    for max_norm, poison in ((0.5, False), (1e6, False), (1.0, True)):
        grads = [torch.randn(40, 30), torch.randn(30)]
        if poison:
            grads[1][3] = float("nan")
        ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        clip_grad_norm(ours, max_norm)
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref)) or poison
        if poison:  # NaN != NaN: compare the bits
            assert all(torch.equal(p.grad.view(torch.int32), q.grad.view(torch.int32)) for p, q in zip(ours, ref))
        changed = not all(torch.equal(p.grad, g) for p, g in zip(ours, grads))
        assert changed == (max_norm == 0.5 or poison)


@pytest.mark.parametrize("clients", [1, 3, 10, 20, 50])
def test_weighted_average_is_stack_multiply_sum_bit_for_bit(clients):
    """The server's average stacks the uploads, converts the stack to float64 and scales and sums
    it in place. It gives exactly what the plain formula gives (a float64 stack of the uploads,
    times the weights, summed over clients) for scalars, small and large tensors, integer
    buffers, float64 (where any other order of the sum would show), and channels-last and
    transposed tensors (whose layout decides that order). Uploads of different shapes are
    refused."""
    from mhpfl.engine.aggregate import weighted_average
    from mhpfl.messages import Upload

    gen = torch.Generator().manual_seed(clients)
    shapes = {"scalar": (), "bias": (7,), "conv": (16, 3, 5, 5), "fc": (600, 512)}
    uploads = []
    for cid in range(clients):
        message = {k: torch.randn(s, generator=gen) * 10.0 ** torch.randint(-6, 6, (), generator=gen)
                   for k, s in shapes.items()}
        message["steps"] = torch.randint(0, 1000, (), generator=gen)
        # float64 shows the summation order; channels-last (as the models' conv weights are) and
        # transposed views show the layout
        message["fc64"] = torch.randn(600, 512, generator=gen, dtype=torch.float64)
        message["conv64"] = torch.randn(32, 16, 5, 5, generator=gen, dtype=torch.float64).to(
            memory_format=torch.channels_last)
        message["conv_cl"] = message["conv"].to(memory_format=torch.channels_last)
        message["fc64_t"] = torch.randn(512, 600, generator=gen, dtype=torch.float64).t()
        uploads.append(Upload(cid, int(torch.randint(1, 500, (), generator=gen)), message))
    w = torch.tensor([u.num_samples for u in uploads], dtype=torch.float64)
    w = w / w.sum()
    ours = weighted_average(uploads)
    for k, t in uploads[0].message.items():
        stacked = torch.stack([u.message[k].to(torch.float64) for u in uploads])
        ref = (w.view(-1, *([1] * t.dim())) * stacked).sum(0).to(t.dtype)
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape and ours[k].stride() == ref.stride()
        assert torch.equal(ours[k], ref), k  # no NaN here: equal values are equal bits
    if clients > 1:
        uploads[-1].message["bias"] = torch.zeros(1)  # uploads of different shapes: refused
        with pytest.raises(RuntimeError):
            weighted_average(uploads)


def test_total_flop_counter_counts_what_flop_counter_mode_counts_without_module_hooks(monkeypatch):
    """lean.total_flop_counter, which the FLOP meter runs every step of a new key under: the same
    total as torch's FlopCounterMode, with gradients flowing through frozen and trainable layers,
    softmax and KL terms (FML, FedKD), MSE (FedProto) and a matmul; the same gradients; no
    module hooks while it counts; torch's own mode when its internals are not as expected."""
    from torch.utils.flop_counter import FlopCounterMode

    from mhpfl import lean

    torch.manual_seed(0)
    a, b = build_model("cnn5", (1, 28, 28), 10), build_model("cnn2", (1, 28, 28), 10)
    a.fc1.requires_grad_(False)
    x, y, w = torch.randn(9, 1, 28, 28), torch.randint(0, 10, (9,)), torch.randn(500, 7, requires_grad=True)

    def step(hooked: list) -> tuple[list, list]:
        hooked.append(len(torch.nn.modules.module._global_forward_pre_hooks))
        (la, ra), lb = a(x, return_rep=True), b(x)
        loss = (F.cross_entropy(la, y) + F.mse_loss(ra, torch.zeros_like(ra)) + (ra @ w).square().mean()
                + F.kl_div(F.log_softmax(la, 1), F.softmax(lb, 1), reduction="batchmean"))
        for p in (*a.parameters(), *b.parameters(), w):
            p.grad = None
        loss.backward()
        return [loss.detach()], [p.grad for p in (*a.parameters(), *b.parameters(), w) if p.grad is not None]

    counts, grads, hooked = [], [], []
    for counter in (FlopCounterMode(display=False), lean.total_flop_counter()):
        with counter:
            grads.append(step(hooked))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    assert all(torch.equal(g, h) for g, h in zip(grads[0][0] + grads[0][1], grads[1][0] + grads[1][1]))
    assert hooked[0] > 0 and hooked[1] == 0  # torch's tracks modules through global hooks; ours not
    assert lean._runs_as_is(torch.ops.aten.mm.default)
    assert not lean._runs_as_is(torch.ops.aten.linear.default)  # has a decomposition: torch's path
    assert not lean._runs_as_is(torch.ops.aten.size.default)  # a metadata query: torch's path
    monkeypatch.setattr(lean, "_TOTAL_COUNTER", False)
    assert type(lean.total_flop_counter()) is FlopCounterMode


@needs_fmnist
def test_runs_are_deterministic_without_importing_inductor(data_root):
    """Deterministic mode is on (warn-only, as before) but start-up no longer pays for
    torch._inductor/_dynamo, triton (torch.utils.flop_counter's optional import) or pandas; two
    seeded runs in fresh processes give the same summary, with FLOPs counted; triton stays
    importable for the rest of the process."""
    code = f"""
import importlib.util, json, sys, torch
from mhpfl.config import RunConfig
from mhpfl.engine import run
cfg = RunConfig(method="standalone", clients=5, rounds=1, train_fraction=0.05, batch_size=32,
                data_root={data_root!r}, download=False)
s = run(cfg, progress=False)
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
assert "torch._inductor" not in sys.modules and "torch._dynamo" not in sys.modules, "inductor imported"
assert not [m for m in sys.modules if m.split(".")[0] in ("triton", "pandas")], "triton or pandas imported"
assert "torch.utils.flop_counter" in sys.modules and s["train_flops"] > 0
if importlib.util.find_spec("triton") is not None:
    import triton.runtime.jit
s.pop("wall_seconds")
print(json.dumps(s, sort_keys=True))
"""
    from mhpfl.datasets import load_dataset

    load_dataset("fmnist", data_root, False)  # the decoded-dataset cache is warm (torchvision not needed)
    procs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(2)]
    assert procs[0].returncode == 0, procs[0].stderr[-2000:]
    assert procs[0].stdout == procs[1].stdout and "per_client_final_acc" in procs[0].stdout
    assert "triton" not in procs[0].stderr


@needs_fmnist
def test_server_training_and_zoo_checks_do_not_import_dynamo(data_root):
    """FedGH's and FedTGP's zoo check (a forward pass for the representation size), their
    server-side training and the server's weighted average (FedAvg, FML, LG-FedAvg, pFedLoRA's
    parallel-model reading) leave torch._dynamo and sympy unloaded: on the meta device, or with
    torch.optim.SGD, they imported dynamo (until session X lean.SGD then fell back to torch's
    step for the rest of the process); `to_empty` on channels-last weights imported sympy.
    pFedLoRA's LoRA readings import peft, whose own import loads transformers, dynamo and sympy
    (docs/performance.md, "Start-up")."""
    code = f"""
import sys
from mhpfl.config import RunConfig
from mhpfl.engine import run
from mhpfl.methods.zoo import rep_dims
assert rep_dims("hetero", 5, (1, 28, 28), 10) == dict.fromkeys(["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"], 500)
for m, zoo, opts in (("fedgh", "hetero", {{}}), ("fedtgp", "hetero", {{}}), ("fedavg", "homo", {{}}),
                     ("pfedlora", "hetero", {{"adapter": "model"}}), ("fml", "hetero", {{}}),
                     ("lgfedavg", "hetero", {{}})):
    run(RunConfig(method=m, zoo=zoo, clients=5, rounds=2, train_fraction=0.02, batch_size=32,
                  data_root={data_root!r}, download=False, method_options=opts), progress=False)
print("torch._dynamo" in sys.modules, "sympy" in sys.modules)
"""
    from mhpfl.datasets import load_dataset

    load_dataset("fmnist", data_root, False)  # the decoded-dataset cache is warm (torchvision not needed)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "False"]


def test_the_flop_analysis_skips_fvcore_nn_package_init_and_leaves_it_intact():
    """The FLOP meter imports fvcore's FlopCountAnalysis without fvcore.nn's package init (its
    TorchScript-compiled losses, the parameter tables with tabulate: 0.05 s of start-up) and
    leaves no trace of that: a later `import fvcore.nn` runs the real package, whose
    FlopCountAnalysis gives the meter's counts."""
    code = """
import sys, torch
from mhpfl.engine.meter import forward_flops
from mhpfl.models import CNN_SPECS, build_model
counts = {a: forward_flops(build_model(a, (1, 28, 28), 10), (1, 28, 28)) for a in CNN_SPECS}
loaded = sorted(m for m in sys.modules if m.startswith("fvcore.nn") or m == "tabulate")
assert not loaded and not hasattr(sys.modules["fvcore"], "nn"), loaded
import fvcore.nn, fvcore.nn.jit_analysis
assert fvcore.nn.jit_analysis.JitModelAnalysis and "tabulate" in sys.modules
for arch, n in counts.items():
    fca = fvcore.nn.FlopCountAnalysis(build_model(arch, (1, 28, 28), 10).eval(), torch.zeros(1, 1, 28, 28))
    assert fca.unsupported_ops_warnings(False).total() == n > 0, arch
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["ok"]


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_so_repeated_batches_do_not_fault_pages_in_again():
    """A training step and an evaluation batch (256 samples each) repeated 10 times: tens of
    thousands of page faults with glibc's default malloc settings, a few thousand once
    retain_freed_memory ran."""
    code = """
import resource, sys, torch
from mhpfl.lean import retain_freed_memory
from mhpfl.models import build_model
if sys.argv[1] == "keep":
    assert retain_freed_memory()
m = build_model("cnn1", (1, 28, 28), 10)
x, xe = torch.randn(256, 1, 28, 28), torch.randn(256, 1, 28, 28)
def step():
    m(x).logsumexp(1).mean().backward()
    with torch.inference_mode():
        m(xe)
step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["OMP_NUM_THREADS"] = "1"
    faults = {}
    for mode in ("default", "keep"):
        p = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        faults[mode] = int(p.stdout.split()[-1])
    # measured: 39,000-53,000 faults by default (glibc adapts its thresholds as it goes), 1,700-4,600
    # kept. (With training batches of 64 the zoo's forward pass, which allocates less since it pools
    # before an in-place ReLU, faults only about 4,000 times by default: too close to call.)
    assert 2 * faults["keep"] < faults["default"], faults


HAS_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


@pytest.mark.parametrize("fused", [
    pytest.param("1", marks=pytest.mark.skipif(not HAS_CC, reason="no C compiler for mhpfl.fused_sgd")),
    "0"])
def test_lean_sgd_is_torch_sgd_bit_for_bit(fused):
    """lean.SGD (no dynamo import; weight decay added to the gradient in place; the first
    step's gradient kept as the momentum buffer; later steps in one pass per parameter through
    mhpfl.fused_sgd, or with MHPFL_FUSED_SGD=0 torch's passes) and torch.optim.SGD, four steps
    each with momentum and weight decay, one layer without a gradient at the first step, one
    thread, channels-last input as the engine's: the same parameters and momentum buffers bit
    for bit. In a fresh process, lean's steps first, without torch._dynamo; then, once torch's
    own optimizer has imported it, lean's steps again on a third model: still lean's own path
    (until session X lean.SGD fell back to torch's step whenever dynamo was loaded)."""
    code = """
import sys, torch
import torch.nn.functional as F
from mhpfl import fused_sgd
from mhpfl.lean import SGD, eager_optimizers
from mhpfl.models import build_model
eager_optimizers()
torch.set_num_threads(1)
torch.manual_seed(0)
a, b, c = (build_model("cnn3", (1, 28, 28), 10) for _ in range(3))
b.load_state_dict(a.state_dict())
c.load_state_dict(a.state_dict())
x, y = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.arange(16) % 10
calls = []
call = fused_sgd._call
fused_sgd._call = lambda *args: calls.append(1) or call(*args)
def train(m, opt):
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        m.fc1.requires_grad_(i > 0)  # a parameter without a gradient at the first step
        F.cross_entropy(m(x), y).backward()
        grads = {p: p.grad for p in m.parameters() if p.grad is not None}
        opt.step()
        if i == 0 and isinstance(opt, SGD):  # lean's path: the first step's gradients became the buffers
            assert all(opt.state[p]["momentum_buffer"] is g and p.grad is None for p, g in grads.items())
    return [opt.state[p]["momentum_buffer"] for p in m.parameters()]
bufs_a = train(a, SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3))
assert "torch._dynamo" not in sys.modules, "lean.SGD imported torch._dynamo"
kernel_calls = len(calls)
bufs_b = train(b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3))
assert "torch._dynamo" in sys.modules
bufs_c = train(c, SGD(c.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3))
print(all(torch.equal(pa, pb) and torch.equal(pa, pc) for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters())),
      all(torch.equal(u, v) and torch.equal(u, w) for u, v, w in zip(bufs_a, bufs_b, bufs_c)),
      kernel_calls, len(calls) - kernel_calls)
"""
    env = {**os.environ, "MHPFL_FUSED_SGD": fused}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    # with the kernel on: its check (a call per test vector), then 10 parameters x 2 steps (the
    # 3rd and 4th: at the 2nd, fc1's first gradient has no buffer yet and torch's passes run),
    # before dynamo and after; off: never called
    from mhpfl.fused_sgd import CHECK_LENGTHS

    on = (str(len(CHECK_LENGTHS) + 20), "20")
    assert p.stdout.split() == ["True", "True", *(on if fused == "1" else ("0", "0"))]


@pytest.mark.skipif(not HAS_CC, reason="no C compiler for mhpfl.fused_sgd")
def test_fused_sgd_is_used_only_where_it_is_torch_bit_for_bit(monkeypatch):
    """mhpfl.fused_sgd: a channels-last conv weight and a linear layer's parameters in one pass,
    the same as torch's passes (weight decay or none); nothing where a gradient has other
    strides, with several torch threads, or with MHPFL_FUSED_SGD=0; and a kernel that rounds
    differently from torch is rejected by its check, so torch's passes run."""
    from mhpfl import fused_sgd
    from mhpfl.lean import SGD

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    gen = torch.Generator().manual_seed(1)
    conv = torch.randn(32, 16, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    params = [conv, torch.randn(500, 77, generator=gen), torch.randn(13, generator=gen)]

    def triples():  # (parameter, gradient, buffer), each in the parameter's layout
        return [tuple(torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen)) for _ in range(3))
                for p in params]

    for wd in (1e-3, 0.0):
        t = triples()
        ref = [tuple(x.clone(memory_format=torch.preserve_format) for x in tr) for tr in t]
        update = fused_sgd.prepare(t, wd, 0.9, 0.01)
        assert update is not None
        update()
        for p, g, buf in ref:
            fused_sgd._torch_passes(p, g, buf, wd, 0.9, 0.01)
        assert all(torch.equal(a, b) for tr, rr in zip(t, ref) for a, b in zip(tr, rr))

    p, g, buf = triples()[0]
    assert fused_sgd.prepare([(p, g.contiguous(), buf)], 1e-3, 0.9, 0.01) is None  # NCHW gradient
    assert fused_sgd.prepare([(p, g, p)], 1e-3, 0.9, 0.01) is None  # one storage twice
    assert fused_sgd.prepare([(p, g, buf)], 1e-3, 0.9, 0.01) is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # torch's passes use every thread
    assert fused_sgd.prepare([(p, g, buf)], 1e-3, 0.9, 0.01) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setenv("MHPFL_FUSED_SGD", "0")
    assert not SGD([torch.nn.Parameter(p)], lr=0.01, momentum=0.9)._fused_step()
    monkeypatch.delenv("MHPFL_FUSED_SGD")

    def one_rounding(lib, p, g, buf, wd, momentum, lr):  # buf * momentum + g rounded once
        buf.copy_((buf.double() * momentum + g.add(p, alpha=wd).double()).float())
        p.add_(buf, alpha=-lr)

    monkeypatch.setattr(fused_sgd, "_call", one_rounding)
    monkeypatch.setattr(fused_sgd, "_checked", {})
    assert fused_sgd.kernel(1e-3, 0.9, 0.01) is None
    assert fused_sgd.prepare(triples(), 1e-3, 0.9, 0.01) is None


@pytest.mark.parametrize("cores,todo,jobs,threads,expected", [
    (2, 38, None, None, (2, 1)),   # default: one process per core, one thread each
    (16, 3, None, None, (3, 5)),   # never more processes than runs to do
    (2, 38, 1, None, (1, 2)),      # one job uses every core
    (2, 38, 2, 4, (2, 1)),         # jobs x threads capped at the cores
    (8, 38, 2, 2, (2, 2)),
])
def test_workers_never_oversubscribe(cores, todo, jobs, threads, expected):
    from mhpfl.benchmark.runner import plan_workers

    assert plan_workers(cores, todo, jobs, threads) == expected
    j, t = expected
    assert j * t <= cores


def test_progress_eta_from_work_done():
    from types import SimpleNamespace

    from mhpfl.benchmark.runner import _clock, _Progress

    cfg = SimpleNamespace(frac=1.0, clients=10, train_fraction=0.1, rounds=10, local_epochs=1)
    todo = [SimpleNamespace(cfg=cfg, group="main", method="m", setting="s", seed=0, value=None)] * 4
    p = _Progress(todo, enabled=False, log=lambda m: None)
    assert p.eta() is None
    p.t0 -= 30.0  # 30 s spent on one run of four equal ones
    p.event(("round", 0, 10))
    assert p.eta() == pytest.approx(90.0, rel=0.05)
    assert _clock(90) == "1m30s" and _clock(3 * 3600 + 60) == "3h01m"


def test_runs_start_longest_first_and_local_epochs_count_as_work():
    """The bench starts the runs with the most work first, so a long run does not start last and
    keep one worker busy alone; 10 local epochs are 10x the work of one (the ETA weighs them so
    too). Among runs of equal work the methods take turns (each method's first run, then each
    one's second: seed 0 of every method before any seed 1), suite order otherwise."""
    from types import SimpleNamespace

    from mhpfl.benchmark.runner import longest_first, round_work

    def entry(name, rounds, epochs=1, frac=1.0, clients=10, method=None):
        cfg = SimpleNamespace(frac=frac, clients=clients, train_fraction=0.1, rounds=rounds, local_epochs=epochs)
        return SimpleNamespace(name=name, cfg=cfg, method=method or name)

    one, ten = entry("one", 80), entry("ten", 80, epochs=10)
    assert round_work(ten.cfg) == 10 * round_work(one.cfg) == 1_000_000
    todo = [entry("short", 10), one, entry("partial", 200, epochs=10, frac=0.1, clients=100), ten,
            entry("one-again", 80)]
    assert [e.name for e in longest_first(todo)] == ["ten", "partial", "one", "one-again", "short"]

    # a suite's order is method by method, seed by seed; a longer run of "a" goes first whatever
    # its turn, and the short "c" run waits for every run of more work
    suite = [entry(f"{m}{s}", 80, method=m) for m in "ab" for s in range(3)] + [
        entry("c0", 40, method="c"), entry("c1", 80, method="c"), entry("a-long", 80, epochs=2, method="a")]
    assert [e.name for e in longest_first(suite)] == ["a-long", "a0", "b0", "c1", "a1", "b1", "a2", "b2", "c0"]


def test_taking_turns_gives_the_eta_every_methods_cost_early():
    """benchmarks/eta_replay.py replays measured runs through the bench's progress bar on a fake
    clock. Two methods, one 3x the other's cost per round: in the suite's order (all seeds of the
    cheap one first) the first ETA knows only the cheap one's rate; with the methods taking turns
    it sees both, and the ETA is closer to the truth all along, for the same schedule length."""
    from types import SimpleNamespace

    from benchmarks.eta_replay import replay
    from mhpfl.benchmark.runner import longest_first

    cfg = SimpleNamespace(frac=1.0, clients=10, train_fraction=0.05, rounds=80, local_epochs=1, eval_every=8)
    suite = [SimpleNamespace(cfg=cfg, group="main", method=m, setting="N10", seed=s, value=None)
             for m in ("cheap", "costly") for s in range(3)]
    cost = {"cheap": 100.0, "costly": 300.0}

    def errors(todo):
        end, lines = replay(todo, [cost[e.method] for e in todo], jobs=2)
        return end, [abs(eta - true) for _, eta, true in lines]

    (end_suite, suite_err), (end_turns, turns_err) = errors(suite), errors(longest_first(suite))
    assert end_suite == end_turns == 700.0
    assert turns_err[0] < suite_err[0] and sum(turns_err) < sum(suite_err)


def test_eta_replay_reads_a_finished_suite():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "eta_replay.py"), "quick", str(root / "results" / "quick")],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "quick, 30 runs, 2 workers, bench order: simulated end" in p.stdout
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "eta_replay.py"), "quick", str(root / "results")],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error: 30 of the suite's runs are not finished")


def test_progress_bar_ends_exactly_full(capsys):
    """Round after round of fractional work (5% of the data, 1 of 3 clients) fills the bar to
    exactly its total: no tqdm 'clamping frac' warning, no negative time left."""
    import warnings
    from types import SimpleNamespace

    from mhpfl.benchmark.runner import _Progress

    cfgs = [SimpleNamespace(frac=0.34, clients=3, train_fraction=0.05, rounds=80, local_epochs=1),
            SimpleNamespace(frac=1.0, clients=10, train_fraction=0.05, rounds=80, local_epochs=3)]
    todo = [SimpleNamespace(cfg=c, group="main", method="m", setting="s", seed=i, value=None)
            for i, c in enumerate(cfgs * 15)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = _Progress(todo, enabled=True, log=lambda m: None)
        for i in range(len(todo)):
            p.event(("start", i))
            for r in range(8, 81, 8):
                p.event(("round", i, r))
            p.done({"index": i, "ok": True, "best": 90.0, "wall": 1.0})
        assert p.bar.n == p.bar.total
        p.close()


def test_precision_and_test_eval_enter_the_run_key_only_when_not_the_default():
    from mhpfl.benchmark.suite import run_key

    base = RunConfig(method="standalone", download=False)
    assert run_key(base) == run_key(RunConfig(method="standalone", download=False, precision="fp32"))
    assert run_key(base) != run_key(RunConfig(method="standalone", download=False, precision="bf16"))
    # likewise --test-eval (every: the keys of the cached runs hold)
    assert run_key(base) == run_key(RunConfig(method="standalone", download=False, test_eval="every"))
    assert run_key(base) != run_key(RunConfig(method="standalone", download=False, test_eval="improved"))
    with pytest.raises(UserError, match="unknown --test-eval 'some'; use every or improved"):
        RunConfig(method="standalone", download=False, test_eval="some").validate()


# Ops whose result the host must read (or whose output size depends on values): on a GPU each
# waits for every queued kernel. Boolean-mask indexing runs nonzero inside the index kernel.
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
              torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default, torch.ops.aten.bincount.default,
              torch.ops.aten.repeat_interleave.Tensor}


def _bool_index(func, args) -> bool:
    if func not in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
        return False
    return any(t is not None and t.dtype == torch.bool for t in args[1])


class _HostReads(TorchDispatchMode):
    """Counts the host reads (HOST_READS, boolean-mask indexing) of the ops run inside."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or _bool_index(func, args):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


# 5 clients, 2 labels each: every label has one holder, so FD's own logits must count for a target
TARGETS_IN_ROUND_2 = {"fd": {"exclude_own": False}}


@needs_fmnist
@pytest.mark.parametrize("batch_clients", [False, True], ids=["one-at-a-time", "batched"])
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_no_host_read_inside_a_training_step(method, batch_clients, tiny_cfg, tmp_path, monkeypatch):
    """The GPU path's promise, checked on CPU: no step (forward, backward, clipping, SGD, the
    batched engine's vmapped step) makes the host read a tensor, so a GPU never waits for the host
    in the training loop (the loss is checked once per epoch, outside the steps). The paths taken
    where reads are not free (`lean.host_reads_are_free`: clipping with torch's call, FD's masked
    distillation as weights) are forced here; FD's read of its mask every step is what this found."""
    from mhpfl import lean
    from mhpfl.engine import batching, context, run

    monkeypatch.setattr(lean, "host_reads_are_free", lambda t: False)
    seen, steps = [], []

    def counted(fn):
        def inner(*a, **kw):
            steps.append(fn.__qualname__)
            with _HostReads(seen):
                return fn(*a, **kw)
        return inner

    for cls, name in ((context.FitRun, "backward"), (context.FitRun, "update"), (batching._Together, "step")):
        monkeypatch.setattr(cls, name, counted(getattr(cls, name)))
    cfg = tiny_cfg(method, rounds=2, batch_clients=batch_clients, train_fraction=0.02, val_size=500,
                   zoo="homo" if method == "fedavg" or batch_clients else "hetero",  # one architecture: batched
                   method_options=TARGETS_IN_ROUND_2.get(method, {}))
    run(cfg, out=tmp_path, progress=False)
    assert len(steps) > 20
    assert ("_Together.step" in steps) == batch_clients  # the vmapped step ran and was checked too
    assert seen == [], f"{method}: {len(seen)} host reads in {len(steps)} steps: {sorted(set(seen))}"


def test_host_read_detector_sees_what_fd_did():
    """The check above can fail: FD's former per-step `bool(mask.any())` and its mask indexing."""
    seen = []
    logits, mask = torch.randn(4, 3), torch.tensor([True, False, True, True])
    with _HostReads(seen):
        bool(mask.any())
        logits[mask].sum()
    assert len(seen) == 2


def test_drawing_batches_reads_nothing_on_the_host():
    """A fit's batches (data order, CIFAR's augmentation) come from the client's stream without a
    host read, so the steps above are the whole training loop's share."""
    split = Split(torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,)), augment=True)
    seen = []
    with _HostReads(seen):
        batches = list(split.batches(32, torch.Generator().manual_seed(0)))
    assert len(batches) == 4 and seen == []


def test_a_cuda_run_computes_in_fp32_not_tf32(monkeypatch):
    """PyTorch lets cuDNN run fp32 convolutions in TF32 by default; a run on CUDA turns that off
    (and TF32 matmuls), so `--precision fp32` means fp32 there too. Checked off CUDA by flipping the
    flags the CUDA path sets (they exist on CPU builds); tests/test_gpu.py checks a real run."""
    from mhpfl.lean import deterministic_algorithms

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        deterministic_algorithms("cpu")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # CPU: untouched
        deterministic_algorithms("cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
