"""The speed work's logic, on CPU: per-epoch non-finite check, bf16 autocast, the evaluation
helper, channels-last models, the dataset cache, deterministic mode without torch._inductor."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mhpfl.config import RunConfig
from mhpfl.datasets import Split
from mhpfl.errors import NonFiniteLoss, UserError
from mhpfl.models import build_model
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


EVERY_METHOD = ["standalone", "fedavg", "fedmd", "fedkd", "fml", "lgfedavg", "fd", "fedproto", "fedgh",
                "fedtgp", "pfedlora"]


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
    loaders.load_dataset.cache_clear()
    first = loaders.load_dataset("fmnist", str(root), False)
    path = loaders.cache_path(root, first.info)
    assert path.exists()
    loaders.load_dataset.cache_clear()
    monkeypatch.setattr(loaders, "_decode", lambda *a: pytest.fail("decoded although cached"))
    cached = loaders.load_dataset("fmnist", str(root), False)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, k), getattr(cached, k))
    monkeypatch.undo()
    path.write_bytes(b"truncated")
    loaders.load_dataset.cache_clear()
    again = loaders.load_dataset("fmnist", str(root), False)
    assert torch.equal(again.test_x, first.test_x)
    loaders.load_dataset.cache_clear()


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


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_so_repeated_batches_do_not_fault_pages_in_again():
    """A training step and an evaluation batch repeated 10 times: tens of thousands of page
    faults with glibc's default malloc settings, a few hundred once retain_freed_memory ran."""
    code = """
import resource, sys, torch
from mhpfl.lean import retain_freed_memory
from mhpfl.models import build_model
if sys.argv[1] == "keep":
    assert retain_freed_memory()
m = build_model("cnn1", (1, 28, 28), 10)
x, xe = torch.randn(64, 1, 28, 28), torch.randn(256, 1, 28, 28)
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
    # measured: 8,400-46,000 faults by default (glibc adapts its thresholds as it goes), 3-2,300 kept
    assert 2 * faults["keep"] < faults["default"], faults


def test_lean_sgd_is_torch_sgd_bit_for_bit():
    from mhpfl.lean import SGD

    torch.manual_seed(0)
    a = build_model("cnn3", (1, 28, 28), 10)
    b = build_model("cnn3", (1, 28, 28), 10)
    b.load_state_dict(a.state_dict())
    opts = [SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
            torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)]
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    for _ in range(3):
        for m, opt in zip((a, b), opts):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


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

    cfg = SimpleNamespace(frac=1.0, clients=10, train_fraction=0.1, rounds=10)
    todo = [SimpleNamespace(cfg=cfg, group="main", method="m", setting="s", seed=0, value=None)] * 4
    p = _Progress(todo, enabled=False, log=lambda m: None)
    assert p.eta() is None
    p.t0 -= 30.0  # 30 s spent on one run of four equal ones
    p.event(("round", 0, 10))
    assert p.eta() == pytest.approx(90.0, rel=0.05)
    assert _clock(90) == "1m30s" and _clock(3 * 3600 + 60) == "3h01m"


def test_progress_bar_ends_exactly_full(capsys):
    """Round after round of fractional work (5% of the data, 1 of 3 clients) fills the bar to
    exactly its total: no tqdm 'clamping frac' warning, no negative time left."""
    import warnings
    from types import SimpleNamespace

    from mhpfl.benchmark.runner import _Progress

    cfgs = [SimpleNamespace(frac=0.34, clients=3, train_fraction=0.05, rounds=80),
            SimpleNamespace(frac=1.0, clients=10, train_fraction=0.05, rounds=80)]
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
