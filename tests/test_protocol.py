"""The evaluation protocol and the FLOP meter: each test pins one definition and fails if it
changes (who is evaluated, which round is selected on which split, the weighted and unweighted
means, participation, set-up at first participation, what a training step costs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mhpfl.config import RunConfig
from mhpfl.engine import FlopMeter, Federation, Recorder
from mhpfl.engine.runner import CONVERGENCE_POINTS, participants
from mhpfl.methods import BUILTIN, get_method
from tests.conftest import needs_fmnist, synthetic_client


def ev(test_correct, test_n, val_correct, val_n, head="model"):
    return {f"{head}/test": test_correct, "n/test": test_n, f"{head}/val": val_correct, "n/val": val_n}


def recorder(rounds=4, clients=2, method="standalone"):
    cfg = RunConfig(method=method, clients=clients, rounds=rounds, download=False)
    return Recorder(cfg, get_method(method)(), ["cnn1"] * clients, [10] * clients)


def test_selected_round_is_the_best_validation_round_not_the_best_test_round():
    rec = recorder(rounds=3)
    rec.record(0, [ev(1, 10, 1, 10), ev(1, 10, 1, 10)], 0)
    rec.record(1, [ev(9, 10, 5, 10), ev(9, 10, 5, 10)], 0)   # best test (90%), worse validation
    rec.record(2, [ev(7, 10, 8, 10), ev(7, 10, 8, 10)], 0)   # best validation (80%)
    rec.record(3, [ev(6, 10, 6, 10), ev(6, 10, 6, 10)], 0)
    s = rec.summary({})
    assert s["selected_round"] == 2 and s["selected_mean_acc"] == pytest.approx(70.0)
    assert s["best_mean_acc"] == pytest.approx(90.0)  # the paper's best-over-rounds on test
    assert s["final_mean_acc"] == pytest.approx(60.0)
    assert s["per_client_selected_acc"] == pytest.approx([70.0, 70.0])


def test_round_zero_is_never_selected_and_ties_take_the_earliest_round():
    rec = recorder(rounds=2)
    rec.record(0, [ev(5, 10, 9, 10)] * 2, 0)  # untrained models with the best validation score
    rec.record(1, [ev(6, 10, 7, 10)] * 2, 0)
    rec.record(2, [ev(8, 10, 7, 10)] * 2, 0)
    s = rec.summary({})
    assert s["selected_round"] == 1 and s["best_mean_acc"] == pytest.approx(80.0)


def test_unweighted_and_weighted_means_and_spread():
    rec = recorder(rounds=1)
    rec.record(0, [ev(0, 10, 0, 10)] * 2, 0)
    # client 0: 9/10 = 90%, client 1: 10/90 = 11.1%: unweighted 50.6%, weighted 19/100 = 19%
    row = rec.record(1, [ev(9, 10, 1, 2), ev(10, 90, 1, 2)], 0)
    assert row["mean_acc"] == pytest.approx((90 + 100 * 10 / 90) / 2)
    assert row["weighted_acc"] == pytest.approx(19.0)
    assert row["mean_val_acc"] == pytest.approx(50.0) and row["weighted_val_acc"] == pytest.approx(50.0)
    assert row["min_acc"] == pytest.approx(100 * 10 / 90) and row["max_acc"] == pytest.approx(90)
    assert row["std_acc"] == pytest.approx(np.std([90, 100 * 10 / 90]))


def test_participation_counts_and_the_participated_mean():
    rec = recorder(rounds=2, clients=3)
    rec.record(0, [ev(1, 10, 1, 10)] * 3, 0)
    rec.participate([0, 2])
    row = rec.record(1, [ev(8, 10, 8, 10), ev(2, 10, 2, 10), ev(6, 10, 6, 10)], 0)
    assert row["participated"] == 2
    assert row["mean_acc_participated"] == pytest.approx(70.0)  # clients 0 and 2 only
    assert row["mean_acc"] == pytest.approx(160 / 3)  # all clients: the primary figure
    rec.participate([2])
    rec.record(2, [ev(8, 10, 8, 10), ev(2, 10, 2, 10), ev(6, 10, 6, 10)], 0)
    s = rec.summary({})
    assert s["participation"] == [1, 0, 2] and s["never_participated"] == 1


def test_convergence_flag_follows_the_last_twenty_percent_rule():
    def run(vals):
        rec = recorder(rounds=len(vals) - 1)
        for r, v in enumerate(vals):
            rec.record(r, [ev(v, 100, v, 100)] * 2, 0)
        return rec.summary({})

    flat = run([10, 50, 60, 70, 80, 80, 80, 80, 80, 80, 80])
    assert flat["converged"] and flat["convergence"]["gain"] == pytest.approx(0.0)
    rising = run([10, 20, 30, 40, 50, 60, 70, 80, 80, 81, 82])  # last 20% (rounds 9, 10) gains 2 points
    assert not rising["converged"] and rising["convergence"]["gain"] == pytest.approx(2.0)
    assert CONVERGENCE_POINTS == 0.5


def test_traffic_and_flops_are_per_evaluated_round_and_cumulative():
    rec = recorder(rounds=2)
    rec.record(0, [ev(1, 10, 1, 10)] * 2, 0)
    rec.traffic(down=100, up=10)
    rec.traffic(down=100, up=10)
    row = rec.record(2, [ev(1, 10, 1, 10)] * 2, 500)
    assert (row["bytes_down"], row["bytes_up"], row["train_flops"]) == (200, 20, 500)
    s = rec.summary({})
    assert (s["bytes_down"], s["bytes_up"], s["train_flops"]) == (200, 20, 500)


# ---- set-up happens at a client's first participation -------------------------------------------
def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@needs_fmnist
@pytest.mark.parametrize("method", sorted(m for m in BUILTIN if m != "fedavg"))
def test_non_participants_are_untrained_after_round_one(method, tiny_cfg, one_thread):
    cfg = tiny_cfg(method, clients=10, frac=0.2, rounds=5, public_size=200,
                   method_options={"public_subset": 50} if method == "fedmd" else {})
    fed = Federation.build(cfg)
    fresh = [_params(c.model) for c in fed.clients]
    assert fed.meter.total == 0  # nothing is trained before round 1, for any method
    cids = fed.play_round(1)
    assert cids == participants(cfg, 1) and len(cids) == 2
    for c, before in zip(fed.clients, fresh):
        if c.cid in cids:
            assert c.ready
        else:
            assert not c.ready and not c.state
            assert all(torch.equal(a, b) for a, b in zip(_params(c.model), before))
    assert fed.meter.total > 0


@needs_fmnist
def test_fedmd_transfer_learning_is_metered_in_the_round_a_client_joins(tiny_cfg, one_thread):
    opts = {"public_subset": 50, "transfer_public_epochs": 1, "transfer_private_epochs": 1}
    cfg = tiny_cfg("fedmd", clients=10, frac=0.2, rounds=5, public_size=200, method_options=opts)
    fed = Federation.build(cfg)
    fed.play_round(1)
    first = fed.meter.total
    p2 = participants(cfg, 2)
    fed.play_round(2)
    second = fed.meter.total - first
    # a newcomer pays its transfer learning in round 2; a returning client does not again
    assert first > 0 and second > 0
    newcomers = [c for c in p2 if c not in participants(cfg, 1)]
    assert all(fed.clients[c].ready for c in p2) and newcomers


# ---- FLOPs: measured as autograd runs them ---------------------------------------------------------
# (fvcore and FlopCounterMode agree on forward passes: tests/test_meters.py)
def _one_step(client, params, loss_fn):
    client.meter.total = 0
    client.fit(params, loss_fn, epochs=1, batch_size=len(client.data.train))
    return client.meter.total


def test_a_training_step_costs_what_autograd_runs():
    c = synthetic_client("standalone", arch="cnn3", n=12)
    model = c.model
    fwd = c.meter.per_sample["cnn3"] * 12
    full = _one_step(c, model.parameters(), lambda x, y: F.cross_entropy(model(x), y))
    # backward is ~2x forward minus the first layer's input gradient (never computed)
    assert 2 * fwd < full < 3 * fwd
    only_fc3 = _one_step(c, model.fc3.parameters(), lambda x, y: F.cross_entropy(model(x), y))
    # training the head alone: a forward pass plus fc3's small backward
    assert fwd <= only_fc3 < 1.1 * fwd


def test_step_flops_are_measured_once_per_key_and_charged_every_step():
    c = synthetic_client("standalone", arch="cnn5", n=12)
    model = c.model
    c.fit(model.parameters(), lambda x, y: F.cross_entropy(model(x), y), epochs=3, batch_size=4)
    assert len(c.meter.step_flops) == 1
    assert c.meter.total == 9 * next(iter(c.meter.step_flops.values()))


def test_pfedlora_adapter_phase_costs_less_than_the_local_phase():
    from mhpfl.methods.pfedlora import PFedLoRA

    c = synthetic_client("pfedlora", arch="cnn1", n=12)
    m = PFedLoRA()
    m.init_client(c)
    adapter, local = m.adapter_params(c.model)

    def ce(x, y):
        return F.cross_entropy(c.model(x), y)

    local_cost = _one_step(c, local, ce)
    adapter_cost = _one_step(c, adapter, ce)
    assert adapter_cost < 0.8 * local_cost  # no weight gradients for the frozen local model


def test_inference_is_charged_one_forward_pass():
    c = synthetic_client("standalone", arch="cnn2", n=12)
    c.infer(c.model, c.data.train)
    assert c.meter.total == 12 * c.meter.per_sample["cnn2"]
    meter = FlopMeter()
    assert meter.total == 0 and not math.isnan(meter.total)


@needs_fmnist
def test_an_unchanged_client_is_not_evaluated_again_and_the_numbers_are_exact(tiny_cfg, one_thread, monkeypatch):
    """With partial participation only the clients that took part since the last evaluation are
    evaluated again; every client's reused evaluation equals a fresh one, round by round."""
    from mhpfl.engine import runner

    calls: list[int] = []
    real = runner.evaluate_client
    monkeypatch.setattr(runner, "evaluate_client", lambda m, c, *a: calls.append(c.cid) or real(m, c, *a))
    cfg = tiny_cfg("fedproto", clients=10, frac=0.2, rounds=5)
    results = {}
    for reuse in (True, False):
        fed = Federation.build(cfg)
        fed.evals.reuse = reuse
        calls.clear()
        evals = [fed.evaluate()]
        assert sorted(calls) == list(range(10))
        for r in range(1, 6):
            n = len(calls)
            cids = fed.play_round(r)
            evals.append(fed.evaluate())
            assert sorted(calls[n:]) == (sorted(cids) if reuse else list(range(10)))
        results[reuse] = evals
    assert results[True] == results[False]


def test_test_split_is_measured_only_where_validation_improves_with_test_eval_improved():
    """--test-eval improved: round 0 has no test columns; a round >= 1 gets the test split when
    some head's mean validation accuracy beats its best so far (a tie does not: the selection
    takes the earliest), and the last round always; the selected and final accuracies are
    what `every` reports, the best-on-test view is null."""
    heads = get_method("fedproto").eval_heads
    rec = recorder(rounds=6, method="fedproto")
    rec.cfg.test_eval = "improved"

    def evs(test, val_first, val_second):
        e = {**ev(test, 10, val_first, 10, heads[0]), **ev(test, 10, val_second, 10, heads[1])}
        return [e, e]

    plan = [(0, evs(1, 9, 9), False),  # round 0: never selected, no test
            (1, evs(5, 5, 5), True),   # the first round >= 1
            (2, evs(6, 5, 5), False),  # a tie on both heads
            (3, evs(7, 4, 6), True),   # only the second head improves
            (4, evs(9, 7, 4), True),   # the first head improves
            (5, evs(9, 6, 6), False),
            (6, evs(3, 2, 2), True)]   # the last round
    for r, e, due in plan:
        assert rec.test_due(r, e) is due, r
        rec.record(r, e, 0, with_test=due)
    measured = [r["round"] for r in rec.rows if not math.isnan(r["mean_acc"])]
    assert measured == [1, 3, 4, 6]
    s = rec.summary({})
    assert s["selected_round"] == 4 and s["selected_mean_acc"] == pytest.approx(90.0)
    assert s[f"selected_mean_acc_{heads[1]}"] == pytest.approx(70.0)  # round 3, its head's best validation
    assert s["final_mean_acc"] == pytest.approx(30.0) and s["per_client_final_acc"] == pytest.approx([30.0, 30.0])
    assert s["best_mean_acc"] is None and s["per_client_best_acc"] is None
    assert s["config"]["test_eval"] == "improved"
    # without validation data (--val-size 0) the selection is the last round: the only one measured
    rec = recorder(rounds=3)
    rec.cfg.test_eval = "improved"
    for r in range(4):
        e = [ev(5 + r, 10, 0, 0)] * 2
        due = rec.test_due(r, e)
        assert due is (r == 3)
        rec.record(r, e, 0, with_test=due)
    s = rec.summary({})
    assert s["selected_round"] == 3 and s["selected_mean_acc"] == pytest.approx(80.0)
    assert s["selection"] == "final round (no validation data)"


@needs_fmnist
@pytest.mark.parametrize("method, frac, epochs", [("fedproto", 1.0, 3), ("standalone", 0.6, 5)])
def test_test_eval_improved_gives_the_same_selected_and_final_results(tiny_cfg, one_thread, monkeypatch,
                                                                       method, frac, epochs):
    """The same run with --test-eval every and improved: identical validation columns,
    selection, selected and final accuracies, bytes and FLOPs; the test split is evaluated at
    exactly the rounds that improve a head's mean validation accuracy, and at the last (with
    partial participation, only for the clients changed since their last test evaluation)."""
    from mhpfl.engine import run, runner

    done: list[tuple[str, int]] = []  # (split, client) of every evaluation of a split
    real = runner.evaluate_client
    monkeypatch.setattr(runner, "evaluate_client", lambda m, c, splits=runner.SPLITS: (
        done.extend((s, c.cid) for s in splits)) or real(m, c, splits))
    ref_rows, rows = [], []
    kw = dict(rounds=8, frac=frac, local_epochs=epochs)  # converges within the run: some rounds do not improve
    every = run(tiny_cfg(method, **kw), progress=False, on_round=ref_rows.append)
    done.clear()
    fast = run(tiny_cfg(method, **kw, test_eval="improved"), progress=False, on_round=rows.append)
    heads = [f"mean_val_acc{'' if i == 0 else f'_{h}'}" for i, h in enumerate(get_method(method).eval_heads)]
    want = [r["round"] for r in ref_rows if r["round"] == 8 or r["round"] >= 1 and any(
        r[h] > max([q[h] for q in ref_rows if 1 <= q["round"] < r["round"]], default=-1) for h in heads)]
    assert [r["round"] for r in rows if not math.isnan(r["mean_acc"])] == want and len(want) < 8
    for a, b in zip(rows, ref_rows, strict=True):
        assert {k: v for k, v in a.items() if "val" in k} == {k: v for k, v in b.items() if "val" in k}
        if not math.isnan(a["mean_acc"]):
            assert {k: v for k, v in a.items() if "wall" not in k} == {k: v for k, v in b.items() if "wall" not in k}
    same = ("selected_round", "selected_mean_acc", "selected_val_mean_acc", "final_mean_acc", "per_client_selected_acc",
            "per_client_final_acc", "convergence", "bytes_up", "bytes_down", "train_flops")
    assert {k: fast[k] for k in same} == {k: every[k] for k in same}
    assert fast["best_mean_acc"] is None and every["best_mean_acc"] is not None
    tested, validated = (sum(s == split for s, _ in done) for split in ("test", "val"))
    if frac == 1.0:  # every client changes every round: each split once per client and round measured
        assert tested == 5 * len(want) and validated == 5 * 9
    else:
        assert 0 < tested < 5 * len(want) and validated < 5 * 9
