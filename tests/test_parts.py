"""Unit tests of the training run's parts (no training run): the best tracker, the step meter, the save
policy, the evaluator schedule, the abstract plan, and the model seams (scan outputs, attention op)."""

import gc
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import tiny_config

from jaxtune import checkpoint, sharding
from jaxtune.best import BestTracker
from jaxtune.evaluators import LossEvaluator, device_batch
from jaxtune.meter import NonFiniteLoss, StepMeter
from jaxtune.models import layers
from jaxtune.plan import model_spec, plan


class Rows:
    """A MetricsWriter stand-in that keeps the rows."""

    def __init__(self):
        self.rows = []

    def write(self, step, split, **values):
        self.rows.append({"step": step, "split": split, **values})


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def step_metrics(loss=1.0):
    return {"loss": jnp.float32(loss), "learning_rate": jnp.float32(0.1), "grad_norm": jnp.float32(2.0)}


# -- best tracker --------------------------------------------------------------------------------------


def test_best_tracker_stops_after_patience_evals_without_a_gain_of_min_delta():
    tracker = BestTracker("loss", "min", min_delta=0.1, patience=2)
    offered = []
    losses = {0: 3.0, 2: 2.0, 4: 1.95, 6: 1.5, 8: 1.45, 10: 1.41}
    stops = {s: tracker.update(s, {"loss": v}, offered.append) for s, v in losses.items()}
    # 4 gains only 0.05 (one bad eval), 6 gains 0.5 (reset), 8 and 10 gain < 0.1: stop at 10.
    assert stops == {0: False, 2: False, 4: False, 6: False, 8: False, 10: True}
    assert offered == [2.0, 1.95, 1.5, 1.45, 1.41]  # every eval but step 0's
    assert tracker.state() == {"value": 1.5, "step": 6, "bad": 2}
    resumed = BestTracker("loss", "min", min_delta=0.1, patience=3)
    resumed.restore(tracker.state())
    assert resumed.update(12, {"loss": 1.45}) is True  # a third bad eval, counted from the restored two


def test_best_tracker_off_and_unknown_metric():
    assert BestTracker("").update(2, {"loss": 1.0}, offer=pytest.fail) is False
    with pytest.raises(Exception, match="checkpoint.best_metric = 'accuracy' is not an eval metric"):
        BestTracker("accuracy").update(2, {"loss": 1.0})


# -- step meter ----------------------------------------------------------------------------------------


def test_step_meter_reports_one_step_late_and_shares_time_before_an_eval_by_flops():
    clock, rows = Clock(), Rows()
    cost = lambda length: (10 * length, 1000.0 * length)  # noqa: E731 (tokens, FLOPs)
    meter = StepMeter(cost, peak=1e6, log_every=1, total=10, writer=rows, clock=clock)
    clock.now = 1.0
    meter.step(1, step_metrics(), 8)
    assert rows.rows == []  # fetched one step late
    clock.now = 3.0
    meter.step(2, step_metrics(), 8)
    assert [r["step"] for r in rows.rows] == [1]
    assert rows.rows[0]["tokens_per_second"] == pytest.approx(80 / 3.0)  # step 1's time: 0 -> 3 s
    assert rows.rows[0]["step_seconds"] == pytest.approx(3.0)
    assert rows.rows[0]["mfu"] == pytest.approx(8000 / 3.0 / 1e6)
    clock.now = 7.0  # steps 2 (rows of 8) and 3 (rows of 24) end before an eval: 4 s shared 1:3
    meter.step(3, step_metrics(), 24, flush=True)
    tps = {r["step"]: r["tokens_per_second"] for r in rows.rows}
    assert tps[2] == pytest.approx(80 / 1.0) and tps[3] == pytest.approx(240 / 3.0)
    assert [r["step_seconds"] for r in rows.rows[1:]] == pytest.approx([1.0, 3.0])
    clock.now = 20.0
    meter.restart()  # the eval's time is no step's
    meter.exclude(4.0)  # nor a compile's
    clock.now = 26.0
    meter.step(4, step_metrics(), 8, flush=True)
    assert rows.rows[-1]["tokens_per_second"] == pytest.approx(80 / 2.0)
    assert meter.last == (4, 1.0) and all(0 < r["mfu"] < 1 for r in rows.rows)


def test_an_inline_step_is_reported_at_once_with_its_own_time():
    # One CPU device with async dispatch off (jaxtune.hostmem): a step has run when it is recorded.
    clock, rows = Clock(), Rows()
    cost = lambda length: (10 * length, 1000.0 * length)  # noqa: E731 (tokens, FLOPs)
    meter = StepMeter(cost, peak=1e6, log_every=1, total=10, writer=rows, clock=clock, inline=True)
    clock.now = 2.0
    meter.step(1, step_metrics(), 8)
    assert [r["step"] for r in rows.rows] == [1]  # not one step late
    assert rows.rows[0]["step_seconds"] == pytest.approx(2.0)
    clock.now = 5.0
    meter.step(2, step_metrics(), 24, flush=True)  # an eval comes next: nothing left to share with
    assert [r["step"] for r in rows.rows] == [1, 2]
    assert rows.rows[1]["step_seconds"] == pytest.approx(3.0)
    assert rows.rows[1]["tokens_per_second"] == pytest.approx(240 / 3.0)
    clock.now = 9.0
    meter.restart()  # the eval's time is no step's
    meter.exclude(0.5)  # nor a compile's
    clock.now = 11.0
    meter.step(3, step_metrics(), 8)
    assert rows.rows[-1]["step_seconds"] == pytest.approx(1.5)
    assert meter.pending is None and meter.last == (3, 1.0)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 4"):  # at its own step, not the next
        meter.step(4, step_metrics(math.nan), 8)


def test_step_meter_counts_the_real_tokens_of_a_step_not_its_padding():
    clock, rows = Clock(), Rows()
    cost = lambda length: (10 * length, 1000.0 * length)  # noqa: E731 (padded tokens, FLOPs)
    meter = StepMeter(cost, peak=1e6, log_every=1, total=10, writer=rows, clock=clock)
    clock.now = 2.0
    meter.step(1, dict(step_metrics(), tokens=jnp.float32(50.0)), 8, flush=True)  # 50 of 80 are real
    assert rows.rows[0]["tokens_per_second"] == pytest.approx(50 / 2.0)
    assert rows.rows[0]["mfu"] == pytest.approx(8000 / 2.0 / 1e6)  # the device computed all 80


def test_step_meter_leaves_out_the_flops_of_tokens_the_output_layer_skipped():
    # 80 token positions, 100 FLOPs each of which 60 are the output layer's; the loss took 30 of
    # them through that layer (losses.OutputOrder), so the step computed 80 * 40 + 30 * 60 FLOPs.
    clock, rows = Clock(), Rows()
    cost = lambda length: (10 * length, 1000.0 * length)  # noqa: E731 (padded tokens, FLOPs)
    meter = StepMeter(cost, peak=1e6, log_every=1, total=10, writer=rows, clock=clock, output_flops=60.0)
    clock.now = 2.0
    meter.step(1, dict(step_metrics(), output_tokens=jnp.float32(30.0)), 8, flush=True)
    assert rows.rows[0]["mfu"] == pytest.approx((80 * 40 + 30 * 60) / 2.0 / 1e6)
    clock.now = 4.0
    meter.step(2, dict(step_metrics(), output_tokens=jnp.float32(80.0)), 8, flush=True)  # none skipped
    assert rows.rows[1]["mfu"] == pytest.approx(80 * 100 / 2.0 / 1e6)


def test_a_measured_peak_is_a_floor_so_mfu_never_reads_above_one():
    clock, rows = Clock(), Rows()
    # 1e6 FLOPs a step against a measured peak of 1e5 FLOP/s: the step itself shows the peak was low.
    meter = StepMeter(
        lambda n: (n, 1e6), peak=1e5, log_every=1, total=3, writer=rows, clock=clock, measured=True
    )
    for step, now in ((1, 1.0), (2, 5.0), (3, 25.0)):  # steps of 5, 10 and 10 s (2 and 3 share 20)
        clock.now = now
        meter.step(step, step_metrics(), 8, flush=step == 3)
    mfu = [r["mfu"] for r in rows.rows]
    assert mfu == pytest.approx([1.0, 0.5, 0.5])  # 2e5 FLOP/s became the peak; 1e5 is half of it
    datasheet = StepMeter(lambda n: (n, 1e6), peak=1e5, log_every=1, total=1, writer=Rows(), clock=clock)
    clock.now = 26.0
    datasheet.step(1, step_metrics(), 8, flush=True)
    assert (
        datasheet.writer.rows[0]["mfu"] > 1
    )  # a datasheet peak is not moved: an MFU above 1 is a bug to see


def test_step_meter_stops_on_a_non_finite_loss_and_logs_every_n():
    rows = Rows()
    meter = StepMeter(lambda n: (n, float(n)), peak=0.0, log_every=2, total=3, writer=rows, clock=Clock())
    meter.step(1, step_metrics(), 4)
    meter.step(2, step_metrics(), 4)
    meter.step(3, step_metrics(), 4, flush=True)
    assert [r["step"] for r in rows.rows] == [2, 3]  # every 2nd step and the last
    assert all(r["mfu"] == 0.0 for r in rows.rows)  # no peak known: no MFU
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 4"):  # reported as step 5 comes
        meter.step(4, step_metrics(math.nan), 4)
        meter.step(5, step_metrics(), 4)


# -- save policy and eval schedule ---------------------------------------------------------------------


def test_save_policy_and_eval_schedule():
    policy = checkpoint.SavePolicy(every_steps=4, total=10)
    assert [s for s in range(1, 11) if policy.due(s)] == [4, 8, 10]
    assert policy.due(5, stopping=True)
    assert [s for s in range(1, 11) if checkpoint.SavePolicy(0, 10).due(s)] == [10]
    evaluator = LossEvaluator(None, None, 8, 0, 0, None, Rows(), every=3)
    assert [s for s in range(1, 10) if evaluator.due(s, last=s == 9)] == [3, 6]  # the end has its own


# -- the plan ------------------------------------------------------------------------------------------


def test_the_plan_allocates_nothing_and_matches_the_materialised_state(text_file):
    config = tiny_config(text_file, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    mesh = sharding.make_mesh(config)
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    p = plan(config, mesh, total_steps=10)
    assert [a.shape for a in jax.live_arrays() if id(a) not in before] == []  # no parameter, no state
    state, frozen = p.materialise()
    got = {
        "params": state["params"],
        "frozen": frozen,
        "opt_state": state["opt_state"],
        "step": state["step"],
    }
    for key, tree in got.items():
        want = p.abstract[key]
        assert jax.tree.structure(tree) == jax.tree.structure(want), key
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), key
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), key
    assert state["params"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )
    # The batch the plan declares is the one the data pipeline makes, and the step compiles from it.
    from jaxtune import data
    from jaxtune.data.loader import Batches
    from jaxtune.pretrained import byte_tokenizer

    rows, _ = data.load(config.data, byte_tokenizer(), 0)
    batch = device_batch(next(Batches(rows, 8, 0)), p.batch_sharding)
    p.check_batch(batch)
    new_state, metrics = p.lower(32).compile()(state, frozen, batch)
    assert int(new_state["step"]) == 1 and np.isfinite(float(metrics["loss"]))


def test_a_classifier_plan_declares_labels_and_weights(text_file):
    config = tiny_config(
        text_file, **{"model.task": "sequence_classification", "data.format": "classification"}
    )
    from jaxtune.models.heads import Labels

    labels = Labels(("a", "b", "c"))
    spec = model_spec(config, labels)
    assert spec.task.labels == ("a", "b", "c")
    batch = plan(config, sharding.make_mesh(config), 10, labels, spec).batch_spec(24)
    assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
        "input_ids": ((8, 24), "int32"),
        "attention_mask": ((8, 24), "int32"),
        "labels": ((8,), "int32"),
        "weights": ((8,), "float32"),
    }
    # Token types come when the tokenizer makes them (BERT's), not because the model has a table for
    # them (RoBERTa's tokenizer makes none); multi-label labels are one float per label.
    multi = Labels(("a", "b", "c"), "multi_label_classification")
    batch = plan(config, sharding.make_mesh(config), 10, multi, token_types=True).batch_spec(24)
    assert batch["token_type_ids"].shape == (8, 24) and batch["labels"].shape == (8, 3)
    assert str(batch["labels"].dtype) == "float32"


@pytest.mark.parametrize("fmt,segments", [("text", False), ("chat", True)])
def test_packing_declares_segment_ids_only_where_rows_are_packed(text_file, fmt, segments):
    config = tiny_config(text_file, **{"data.packing": True, "data.format": fmt})
    batch = plan(config, sharding.make_mesh(config), 10).batch_spec(16)
    assert ("segment_ids" in batch) == segments and batch["loss_mask"].dtype == np.float32


# -- model seams ---------------------------------------------------------------------------------------


def test_scan_returns_per_layer_outputs():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.w = layers.param(rngs, layers.ones, (3,), ("embed",), jnp.float32)

    stacked = layers.stack(4, Block, nnx.Rngs(0))

    def step(block, x, i):
        x = x + block.w[...] * i
        return x, x.sum()

    x, ys = layers.scan(stacked, jnp.zeros(3), jnp.arange(4.0), step, outputs=True)
    np.testing.assert_allclose(np.asarray(x), [6.0, 6.0, 6.0])
    np.testing.assert_allclose(np.asarray(ys), [0.0, 3.0, 9.0, 18.0])
    assert (
        np.asarray(layers.scan(stacked, jnp.zeros(3), jnp.arange(4.0), lambda b, x, i: x + i)).tolist()
        == [6.0] * 3
    )


@pytest.mark.parametrize("t,s", [(6, 6), (1, 9), (3, 9)])
def test_the_attention_op_takes_queries_shorter_than_keys_in_every_implementation(t, s):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32)
    # The last t of s positions, causally: a decode step (t = 1) or a chunk against a cache.
    mask = (jnp.arange(s)[None, :] <= jnp.arange(s - t, s)[:, None])[None].repeat(2, 0)
    mask = mask.at[1, :, 0].set(False)  # and a padded key in the second row
    ref = layers.attend(q, k, v, mask, scale=8**-0.5)
    xla = layers.attend(q, k, v, mask, scale=8**-0.5, impl="xla")
    assert ref.shape == (2, t, 4, 8)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), atol=1e-5, rtol=0)
    # By hand: query head 3 reads key/value head 1 (4 query heads over 2).
    scores = np.einsum("th,sh->ts", np.asarray(q[1, :, 3]), np.asarray(k[1, :, 1])) * 8**-0.5
    seen = np.asarray(mask[1]).any(-1)  # a query that sees no key (padding) has no defined answer
    scores = np.where(np.asarray(mask[1]), scores, -1e30)[seen]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ref[1, :, 3])[seen], probs @ np.asarray(v[1, :, 1]), atol=1e-5)
    with pytest.raises(ValueError, match="'flash' is not one of reference, xla"):
        layers.attend(q, k, v, mask, scale=1.0, impl="flash")


# -- evaluators and the end of the run -----------------------------------------------------------------


def test_a_classifier_evaluator_scores_the_real_rows_and_writes_its_confusion_matrix(tmp_path):
    import json

    from jaxtune.evaluators import ClassifierEvaluator
    from jaxtune.models.heads import Labels

    labels = np.array([0, 1, 1, 0, 1], np.int32)
    rows = {
        "input_ids": np.arange(5)[:, None].repeat(4, 1).astype(np.int32),
        "attention_mask": np.ones((5, 4), np.int32),
        "labels": labels,
        "weights": np.ones(5, np.float32),
    }

    def eval_step(
        params, frozen, batch
    ):  # predicts label 1 for ids 1..4 and 0 for id 0; padding rows count 0
        predictions = (batch["input_ids"][:, 0] > 0).astype(np.int32)
        return {
            "loss_sum": np.float32(batch["weights"].sum() * 0.5),
            "count": batch["weights"].sum(),
            "predictions": predictions,
            "labels": batch["labels"],
            "weights": batch["weights"],
        }

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    writer = Rows()
    evaluator = ClassifierEvaluator(
        eval_step, rows, 4, 0, 0, shard, writer, 0, labels=Labels(("neg", "pos")), workdir=str(tmp_path)
    )
    values = evaluator(7, None, None)
    # 5 real rows in two batches of 4 (3 padding rows left out): predicted 0,1,1,1,1 against 0,1,1,0,1.
    assert values["loss"] == pytest.approx(0.5) and values["accuracy"] == pytest.approx(4 / 5)
    assert writer.rows == [{"step": 7, "split": "eval", **values}]
    matrix = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert matrix == {"step": 7, "labels": ["neg", "pos"], "matrix": [[1, 1], [0, 3]]}
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0


def test_the_end_of_the_run_takes_the_best_checkpoint_only_when_asked_and_when_it_differs():
    from jaxtune import finish
    from jaxtune.config import defaults

    class Checkpoints:
        def __init__(self, best):
            self.best = best
            self.restored = []

        def best_step(self):
            return self.best

        def wait(self):
            pass

        def restore_best(self, step, abstract):
            self.restored.append(step)
            return {"params": {"w": step}, "frozen": {}}

    config = defaults()
    state = {"params": {"w": 12}, "opt_state": (), "step": 12}
    abstract = {"params": {}, "frozen": {}}
    assert finish.load_best(config, Checkpoints((4, 0.9)), 12, state, {}, abstract)[2] is None  # not asked
    config.checkpoint.load_best_at_end = True
    ckpt = Checkpoints((4, 0.9))
    new_state, _, step = finish.load_best(config, ckpt, 12, state, {}, abstract)
    assert step == 4 and new_state["params"] == {"w": 4} and new_state["step"] == 12 and ckpt.restored == [4]
    assert (
        finish.load_best(config, Checkpoints((12, 0.9)), 12, state, {}, abstract)[2] is None
    )  # it is the last
    config.checkpoint.load_best_at_end = False
    config.export.at_end = True  # an export of the best (export.checkpoint = "best") ends on it too
    assert finish.wants_best(config)
    config.export.checkpoint = "last"
    assert not finish.wants_best(config)
