"""LoRA: training only the adapters, merged and PEFT exports proven against peft itself, adapter import,
exact resume."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_models import ATOL_LOGITS, hf_logits, make_model
from runs import losses, one_device, tiny_config

import jaxtune
from jaxtune import adapter, checkpoint, export, optim, pretrained, sharding, train
from jaxtune.models import lora, presets
from jaxtune.plan import model_spec, plan


def _base(tmp_path, variant="llama", task="causal_lm", **changes):
    """A tiny random Hugging Face model over jaxtune's byte tokenizer, saved with it."""
    ref = make_model(variant, task=task, vocab_size=257, **changes)
    path = tmp_path / f"base-{variant}-{task}"
    ref.save_pretrained(path)
    jaxtune.load_tokenizer("bytes").save_pretrained(path)
    return str(path)


def _params(model) -> dict:
    return {k: np.asarray(v) for k, v in pretrained.model_state(model).items()}


def _randomise_adapters(model, seed=1):
    """Adapters with non-zero B (and a perturbed head), as after training."""
    key = jax.random.key(seed)
    for path, module in lora.dense_layers(model):
        if hasattr(module, lora.B):
            key, sub = jax.random.split(key)
            module.lora_b.set_value(jax.random.normal(sub, module.lora_b.shape) * 0.2)
        elif path.split(".")[0] in ("score", "classifier"):
            key, sub = jax.random.split(key)
            module.kernel.set_value(module.kernel[...] + jax.random.normal(sub, module.kernel.shape) * 0.2)


def _peft_model(base, adapter_dir, auto):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(getattr(transformers, auto).from_pretrained(base), adapter_dir)
    bad = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert not bad, bad  # PEFT only warns; a silently missing B would leave a no-op adapter
    return model.eval()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA SFT of a tiny Llama on a small text corpus: eval before and after."""
    from runs import TEXT

    tmp = tmp_path_factory.mktemp("lora")
    (tmp / "corpus.txt").write_text(TEXT)
    base = _base(tmp)
    c = tiny_config(str(tmp / "corpus.txt"))
    c.model.path, c.model.tokenizer = base, ""
    c.lora.rank, c.lora.alpha, c.lora.targets = 4, 8.0, r"attn\.(q|v)_proj|mlp\.down_proj"
    c.train.max_steps, c.optimizer.lr = 30, 1e-2
    c.eval.at_start, c.eval.every_steps = True, 30
    workdir = str(tmp / "run")
    train.run(c, workdir)
    return base, workdir, c


def test_lora_training_lowers_eval_loss_and_changes_only_the_adapters(lora_run):
    base, workdir, _ = lora_run
    rows = [json.loads(x) for x in open(f"{workdir}/metrics.jsonl")]
    evals = [r["loss"] for r in rows if r["split"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.05, evals
    trained, _ = checkpoint.restore_model(workdir)
    before = _params(jaxtune.load_pretrained(base))
    after = _params(trained)
    adapters = {p for p in after if lora.is_adapter(p)}
    assert adapters and set(after) - adapters == set(before)
    for path, value in before.items():
        assert np.array_equal(after[path], value), path  # the base is bit-identical
    assert all(np.abs(after[p]).max() > 0 for p in adapters if p.endswith(lora.B))


def test_merged_export_and_peft_adapter_give_the_adapter_models_logits(lora_run, tmp_path):
    base, workdir, _ = lora_run
    trained, _ = checkpoint.restore_model(workdir)
    ids = np.random.RandomState(0).randint(0, 257, (2, 12))
    mask = np.ones_like(ids)
    want = np.asarray(trained(ids, mask))
    assert export.main(["--checkpoint", workdir, "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(hf_logits(merged, ids, mask), want, atol=ATOL_LOGITS, rtol=0)

    out = tmp_path / "adapter"
    assert export.main(["--checkpoint", workdir, "--out", str(out), "--adapter"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == base and config["bias"] == "none"
    with torch.no_grad():
        got = _peft_model(base, str(out), "AutoModelForCausalLM")(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=ATOL_LOGITS, rtol=0)

    # model.adapter / adapter.load: the adapter back onto the base gives the same logits again.
    loaded = adapter.load(jaxtune.load_pretrained(base), str(out))
    np.testing.assert_allclose(np.asarray(loaded(ids, mask)), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "variant,task,auto",
    [
        ("llama", "sequence_classification", "AutoModelForSequenceClassification"),
        ("bert", "sequence_classification", "AutoModelForSequenceClassification"),
        ("distilbert", "sequence_classification", "AutoModelForSequenceClassification"),
        ("gpt2", "causal_lm", "AutoModelForCausalLM"),
    ],
)
def test_peft_round_trip_of_classifiers_and_conv1d_layers(variant, task, auto, tmp_path):
    """A classifier's head trains beside the adapters (PEFT's modules_to_save) and travels in the file;
    GPT-2's fused Conv1D qkv layer maps onto PEFT's fan_in_fan_out adapter."""
    extra = {"num_labels": 3, "pad_token_id": 0} if task != "causal_lm" else {}
    ref = make_model(variant, task=task, **extra)
    base = tmp_path / "base"
    ref.save_pretrained(base)
    targets = r"attn\.(qkv|o)_proj" if variant == "gpt2" else r"attn\.(q|v)_proj|mlp\.up"
    spec = lora.LoraSpec(4, 16.0, targets, rslora=variant == "bert")
    model = jaxtune.load_pretrained(base, lora=spec)
    _randomise_adapters(model)
    ids = np.random.RandomState(2).randint(1, 97, (2, 9))
    mask = np.ones_like(ids)
    want = np.asarray(model(ids, mask))
    adapter.save(model, str(tmp_path / "adapter"), base=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if task != "causal_lm":
        assert config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    with torch.no_grad():
        peft_model = _peft_model(str(base), str(tmp_path / "adapter"), auto)
        got = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=ATOL_LOGITS, rtol=0)
    again = adapter.load(jaxtune.load_pretrained(base), str(tmp_path / "adapter"))
    np.testing.assert_allclose(np.asarray(again(ids, mask)), want, atol=1e-6, rtol=0)


def test_step_zero_equals_the_base_and_the_plan_trains_only_adapters(text_file):
    c = tiny_config(text_file, **{"lora.rank": 8, "lora.base_dtype": "bfloat16"})
    mesh = sharding.make_mesh(c, jax.devices())
    p = plan(c, mesh, 5, spec=model_spec(c))
    trainable = optim.paths(p.abstract["params"])
    assert trainable and all(lora.is_adapter(x) for x in trainable)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p.abstract["frozen"]))
    # Adapters sit in the stacked layers, their input and output sides sharded like the base weight.
    a = p.spec.state["layers"]["attn"]["q_proj"]["lora_a"]
    assert a.shape[0] == p.spec.cfg.num_layers and a.get_metadata()["out_sharding"] == (
        "layers",
        "embed",
        "lora_rank",
    )
    base = pretrained.model_from_config(presets.hf_config("llama-tiny"))
    adapted = pretrained.model_from_config(presets.hf_config("llama-tiny"), lora=p.spec.lora)
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(adapted(ids)), np.asarray(base(ids)))  # B = 0


def test_resume_with_lora_is_bit_exact(text_file, tmp_path):
    changes = {"lora.rank": 4, "lora.dropout": 0.1, "train.max_steps": 6}
    train.run(tiny_config(text_file, **changes), str(tmp_path / "whole"))
    train.run(tiny_config(text_file, **changes), str(tmp_path / "cut"), stop_after=3)
    train.run(tiny_config(text_file, **changes), str(tmp_path / "cut"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    a = _params(checkpoint.restore_model(str(tmp_path / "whole"))[0])
    b = _params(checkpoint.restore_model(str(tmp_path / "cut"))[0])
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_model_adapter_in_a_config_puts_the_peft_adapter_on_the_base(tmp_path):
    base = _base(tmp_path)
    spec = lora.LoraSpec(4, 8.0, r"attn\.(q|k)_proj|mlp\.gate")
    model = jaxtune.load_pretrained(base, lora=spec)
    _randomise_adapters(model)
    adapter.save(model, str(tmp_path / "adapter"), base=base)
    c = tiny_config(str(tmp_path / "unused.txt"), **{"model.path": base, "model.tokenizer": ""})
    c.model.adapter = str(tmp_path / "adapter")
    mesh = sharding.make_mesh(c, jax.devices())
    ms = model_spec(c)
    assert ms.lora.rank == 4 and ms.lora.alpha == 8.0
    assert sorted(p for p, _ in lora.targeted(jaxtune.load_pretrained(base, lora=ms.lora), ms.lora)) == [
        "layers.attn.k_proj",
        "layers.attn.q_proj",
        "layers.mlp.gate_proj",
    ]
    from jaxtune.plan import load_model, mesh_rules

    loaded = load_model(c, mesh, mesh_rules(c), lora=ms.lora)
    ids = np.arange(20).reshape(2, 10)
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), atol=1e-6, rtol=0)


def test_a_bfloat16_base_restores_exports_and_refuses_a_plain_adapter_export(text_file, tmp_path):
    changes = {"lora.rank": 4, "lora.base_dtype": "bfloat16", "train.max_steps": 2}
    train.run(tiny_config(text_file, **changes), str(tmp_path / "run"))
    model, _ = checkpoint.restore_model(str(tmp_path / "run"))
    assert model.lora is not None and model.lora.rank == 4
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    assert (
        export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "a"), "--adapter"]) == 0
    )
    train.run(tiny_config(text_file, **{"train.max_steps": 1}), str(tmp_path / "full"))
    assert (
        export.main(["--checkpoint", str(tmp_path / "full"), "--out", str(tmp_path / "b"), "--adapter"]) != 0
    )


def test_lora_sharded_with_accumulation_and_remat_gives_the_single_device_losses(text_file, tmp_path):
    """Adapters sharded like their base weights (fsdp 4 x tensor 2), two accumulated micro-batches and
    full remat: the losses of one device taking whole batches."""
    lora_keys = {"lora.rank": 4, "lora.targets": r"attn\.(q|k|v|o)_proj|mlp\.", "train.max_steps": 4}
    single = tiny_config(text_file, **lora_keys, **{"mesh.data": 1})
    sharded = tiny_config(
        text_file,
        **lora_keys,
        **{
            "mesh.data": 1,
            "mesh.fsdp": 4,
            "mesh.tensor": 2,
            "train.grad_accum_steps": 2,
            "model.remat": "full",
        },
    )
    train.run(single, str(tmp_path / "one"), devices=jax.devices()[:1])
    train.run(sharded, str(tmp_path / "eight"))
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(one) == [1, 2, 3, 4]
    np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], atol=1e-5, rtol=0)
    assert one[4] < one[1]


def test_lora_classifier_trains_its_head_keeps_the_best_and_exports_a_peft_adapter(tmp_path):
    """all-MiniLM-L6-v2 with adapters and a trained head (PEFT's modules_to_save), best-k by accuracy:
    it learns, and peft puts the exported adapter on the Hugging Face base with jaxtune's logits."""
    from jaxtune import assets

    rng = np.random.RandomState(0)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "poor", "bad"]
    rows = []
    for _ in range(240):
        pos = rng.rand() < 0.5
        rows.append(
            {"text": f"the film was {rng.choice(good if pos else bad)}", "label": "pos" if pos else "neg"}
        )
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = tiny_config(str(tmp_path / "train.jsonl"))
    c.model.path, c.model.tokenizer, c.model.task = assets.minilm(), "", "sequence_classification"
    c.data.format, c.data.eval_fraction, c.data.seq_len = "classification", 0.2, 16
    c.lora.rank, c.lora.alpha = 8, 16.0
    c.train.batch_size, c.train.max_steps, c.optimizer.lr = 16, 24, 3e-3
    c.eval.at_start, c.eval.every_steps = True, 12
    c.checkpoint.best_metric, c.checkpoint.best_keep = "accuracy", 1
    workdir = tmp_path / "run"
    train.run(c, str(workdir), devices=one_device())
    evals = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "eval"]
    assert evals[-1]["accuracy"] >= 0.9 and evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.2, evals
    assert json.loads((workdir / "checkpoints_best" / "best.json").read_text())["kept"]
    model, tok = checkpoint.restore_model(str(workdir))
    enc = tok(["the film was superb", "the film was dull"], padding=True, return_tensors="np")
    want = np.asarray(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    out = tmp_path / "adapter"
    assert export.main(["--checkpoint", str(workdir), "--out", str(out), "--adapter"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    peft_model = _peft_model(assets.minilm(), str(out), "AutoModelForSequenceClassification")
    with torch.no_grad():
        got = peft_model(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=ATOL_LOGITS, rtol=0)
