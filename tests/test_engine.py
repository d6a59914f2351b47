import json

import pandas as pd
import pytest
import torch

from mhpfl.engine import run
from mhpfl.engine.runner import ROUND_COLUMNS, participants
from mhpfl.errors import NonFiniteLoss, UserError
from tests.conftest import fit_flops, needs_fmnist, strip_timing


@needs_fmnist
def test_standalone_sends_nothing_and_learns(tiny_cfg, tmp_path):
    s = run(tiny_cfg("standalone", rounds=2), out=tmp_path, progress=False)
    assert s["bytes_up"] == s["bytes_down"] == 0
    assert s["best_mean_acc"] > 70
    assert s["train_flops"] > 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("method", "config", "best_mean_acc", "final_mean_acc", "per_client_best_acc",
                "bytes_up", "bytes_down", "train_flops", "flops_per_sample", "rounds_run", "wall_seconds"):
        assert key in saved
    assert saved["config"]["seed"] == 0 and "torch" in saved["config"]["versions"]
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert list(rounds.columns[: len(ROUND_COLUMNS)]) == ROUND_COLUMNS
    assert rounds["round"].tolist() == [0, 1, 2]
    assert rounds["train_flops"].iloc[0] == 0  # nothing is trained before round 1
    assert rounds["train_flops"].sum() == s["train_flops"]


@needs_fmnist
def test_train_flops_equal_the_metered_passes(tiny_cfg):
    """Standalone, 1 epoch: every batch is one forward + backward step, as FlopCounterMode counts it."""
    from mhpfl.models import build_model

    cfg = tiny_cfg("standalone", rounds=1)
    s = run(cfg, progress=False)
    expected = sum(fit_flops(build_model(a, (1, 28, 28), 10), n, cfg.batch_size)
                   for a, n in zip(s["client_archs"], s["client_train_samples"]))
    assert s["train_flops"] == expected


@needs_fmnist
def test_seeded_runs_are_identical_and_seeds_matter(tiny_cfg):
    a = run(tiny_cfg("pfedlora", rounds=1), progress=False)
    b = run(tiny_cfg("pfedlora", rounds=1), progress=False)
    c = run(tiny_cfg("pfedlora", rounds=1, seed=1), progress=False)
    assert strip_timing(a) == strip_timing(b)
    assert strip_timing(a)["per_client_final_acc"] != strip_timing(c)["per_client_final_acc"]


@needs_fmnist
def test_fedavg_homogeneous(tiny_cfg):
    s = run(tiny_cfg("fedavg", zoo="homo", rounds=2), progress=False)
    n_params = 2_044_758
    assert s["bytes_up"] == s["bytes_down"] == 2 * 5 * 4 * n_params
    assert s["best_mean_acc"] > 60


def test_participants_are_seeded_and_sized(tiny_cfg):
    cfg = tiny_cfg("standalone", clients=10, frac=0.3)
    p1 = participants(cfg, 1)
    assert len(p1) == 3 and p1 == participants(cfg, 1)
    assert any(participants(cfg, r) != p1 for r in range(2, 6))


@needs_fmnist
def test_nan_loss_stops_with_a_clear_error(tiny_cfg):
    with pytest.raises(NonFiniteLoss, match=r"standalone: loss became (nan|inf) on client 0 in round 1; lower --lr"):
        run(tiny_cfg("standalone", lr=1e12, grad_clip=0.0), progress=False)


@pytest.mark.parametrize("kw,msg", [
    (dict(frac=0.0), "--frac"), (dict(frac=1.5), "--frac"), (dict(rounds=0), "--rounds"),
    (dict(partition="pathological:11"), "K <= 10"), (dict(clients=7, partition="pathological:2"), "divisible"),
    (dict(dataset="svhn"), "unknown dataset"), (dict(zoo="hetero", method="fedavg"), "homo"),
    (dict(method="nope"), "unknown method"), (dict(train_fraction=0), "--train-fraction"),
    (dict(device="tpu"), "unknown device"),
])
def test_bad_settings_are_user_errors(tiny_cfg, kw, msg):
    method = kw.pop("method", "standalone")
    with pytest.raises(UserError, match=msg):
        tiny_cfg(method, **kw).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_user_error(tiny_cfg):
    with pytest.raises(UserError, match="no CUDA GPU"):
        tiny_cfg("standalone", device="cuda").validate()


@needs_fmnist
def test_public_pool_is_held_out_or_named(tiny_cfg):
    from mhpfl.datasets import PartitionSpec, federate

    cfg = tiny_cfg("standalone")
    kw = dict(data_root=cfg.data_root, download=False, train_fraction=0.05)
    held = federate("fmnist", 5, PartitionSpec.parse("pathological:2"), 0, public_size=6000, **kw)
    named = federate("fmnist", 5, PartitionSpec.parse("pathological:2"), 0, public_size=6000,
                     public="fmnist", **kw)
    assert len(held.public) == len(named.public) == 300  # --public-size x --train-fraction
    assert not torch.equal(held.public.x, named.public.x)  # a seeded draw of the named split
    with pytest.raises(UserError, match=r"--public cifar10 \(3x32x32\) does not fit fmnist"):
        federate("fmnist", 5, PartitionSpec.parse("pathological:2"), 0, public="cifar10", **kw)
    with pytest.raises(UserError, match="unknown dataset"):
        tiny_cfg("fedmd", public="imagenet").validate()


@pytest.mark.parametrize("method,opts,msg", [
    ("fedproto", {"weighting": "median"}, "fedproto: --weighting must be one of count, uniform"),
    ("lgfedavg", {"weighting": "x"}, "lgfedavg: --weighting must be one of samples, uniform"),
    ("fml", {"meme": "resnet"}, "fml: --meme must be one of cnn1"),
    ("pfedlora", {"ranks": 4}, "pfedlora has no option ranks"),
    ("fml", {"alpha": 1.5}, r"fml: --alpha must be in \[0, 1\] \(got 1.5\)"),
    ("fedkd", {"t_start": 0.0}, r"fedkd: --t-start must be in \(0, 1\]"),
    ("fd", {"temperature": 0.0}, r"fd: --temperature must be in \(0, inf\)"),
    ("fedproto", {"ld": float("nan")}, r"fedproto: --ld must be in \[0, inf\) \(got nan\)"),
    ("fedmd", {"digest_batch": 0}, r"fedmd: --digest-batch must be in \[1, inf\)"),
    ("pfedlora", {"adapter_epochs": -1}, r"pfedlora: --adapter-epochs must be in \[0, inf\)"),
])
def test_method_options_are_checked_once_for_every_method(method, opts, msg):
    from mhpfl.methods import get_method

    with pytest.raises(UserError, match=msg):
        get_method(method)(**opts)


def test_every_numeric_option_of_a_builtin_method_has_a_range():
    from mhpfl.methods import BUILTIN, get_method
    from mhpfl.methods.base import in_interval

    for name in BUILTIN:
        for k, o in get_method(name).options.items():
            if isinstance(o.default, (int, float)) and not isinstance(o.default, bool):
                assert o.interval is not None, f"{name} --{k} has no interval"
                assert in_interval(o.default, o.interval), f"{name} --{k}: default outside {o.interval}"
    assert in_interval(1, "[1, inf)") and not in_interval(1, "(1, inf)") and not in_interval(1.0, "[0, 1)")
    assert not in_interval("eight", "[1, inf)") and not in_interval(None, "[0, 1]")
