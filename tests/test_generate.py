"""The generation engine (KV cache, sampling, stops) against transformers and against itself."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import VARIANTS, make_model

import jaxtune
from jaxtune.engine import Engine, bucket
from jaxtune.generate import main as generate_main
from jaxtune.models import layers
from jaxtune.sampling import Sampler, filter_logits

PAD = 0


def _saved(variant, tmp_path, **changes):
    ref = make_model(variant, **changes)
    path = tmp_path / variant
    ref.save_pretrained(path)
    return ref, jaxtune.load_pretrained(path)


def _prompts(seed=0, lengths=(9, 5, 12)):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 97, n).tolist() for n in lengths]


def _hf_greedy(ref, prompts, new):
    """transformers' greedy tokens for left-padded prompts, cut at the first EOS as jaxtune cuts."""
    t = max(map(len, prompts))
    ids, mask = np.full((len(prompts), t), PAD), np.zeros((len(prompts), t), np.int64)
    for r, p in enumerate(prompts):
        ids[r, t - len(p) :], mask[r, t - len(p) :] = p, 1
    with torch.no_grad():
        out = ref.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=PAD,
            eos_token_id=None,
        )
    return out[:, t:].tolist()


@pytest.mark.e2e
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_equal_transformers_batched_with_left_padding(variant, tmp_path):
    """Every decoder family, Gemma 2's sliding window (4) shorter than the prompts and GPT-2's learned
    positions included; scanned and unrolled layers alike."""
    ref, model = _saved(variant, tmp_path)
    prompts = _prompts()
    want = _hf_greedy(ref, prompts, 16)
    for unroll in (False, True):
        assert Engine(model, unroll=unroll).generate(prompts, 16, pad_id=PAD) == want, unroll


def _jitted_extend(m, per_layer):
    """``m.extend`` then the logits, jitted: one compile for a prompt and one for all the single-token
    steps after it (op by op, the same test ran 3x longer)."""

    @jax.jit
    def extend(ids, positions, cache, key_mask, slot):
        hidden, cache = m.extend(ids, positions, cache, key_mask, slot, blocks=per_layer)
        return m.logits(hidden), cache

    return extend


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["llama", "gemma2", "gpt2"])
def test_cached_logits_equal_uncached(variant, tmp_path):
    """Prefill then one token at a time through the cache gives the logits of one forward pass over the
    whole sequence, to 1e-5, left padding included."""
    _, model = _saved(variant, tmp_path)
    rng = np.random.RandomState(1)
    ids = rng.randint(3, 97, (2, 14)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    want = np.asarray(model(ids, mask))
    prompt = 8
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    for blocks in (None, "unrolled"):
        graph, state = Engine(model, unroll=blocks is not None)._layout(2)
        m, per_layer = graph.model(state)
        extend = _jitted_extend(m, per_layer)
        cache = m.empty_cache(2, ids.shape[1], jnp.float32)
        key_mask = np.zeros_like(mask)
        key_mask[:, :prompt] = mask[:, :prompt]
        logits, cache = extend(ids[:, :prompt], positions[:, :prompt], cache, key_mask, 0)
        got = [np.asarray(logits)]
        for slot in range(prompt, ids.shape[1]):
            key_mask[:, slot] = mask[:, slot]
            s = slice(slot, slot + 1)
            logits, cache = extend(ids[:, s], positions[:, s], cache, key_mask, slot)
            got.append(np.asarray(logits))
        got = np.concatenate(got, axis=1)
        real = mask > 0
        np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


def _compiles(caplog, name):
    return sum(f"Finished XLA compilation of jit({name})" in r.getMessage() for r in caplog.records)


def test_decode_step_compiles_once_per_generation_and_buckets_are_reused(tmp_path, caplog):
    _, model = _saved("llama", tmp_path)
    engine = Engine(model)
    caplog.set_level(logging.WARNING)
    with jax.log_compiles():
        out = engine.generate(_prompts(), 24, pad_id=PAD)
        assert engine.stats["decode_steps"] == 23
        assert _compiles(caplog, "_decode") == 1 and _compiles(caplog, "_prefill") == 1
        caplog.clear()
        # Other prompts of the same buckets (3 rows -> 4, length <= 16, 24 new tokens): no compile at all.
        engine.generate(_prompts(seed=5, lengths=(3, 14, 7)), 24, pad_id=PAD)
        assert _compiles(caplog, "_decode") == 0 and _compiles(caplog, "_prefill") == 0
    assert [len(r) for r in out] == [24, 24, 24]
    assert bucket(3) == 4 and bucket(1) == 1 and bucket(9, 16) == 16 and bucket(17, 16) == 32


def test_eos_ends_a_row_and_is_kept(tmp_path):
    _, model = _saved("llama", tmp_path)
    prompts = _prompts()
    free = Engine(model).generate(prompts, 12, pad_id=PAD)
    eos = free[1][4]  # the fifth token of the second row becomes its EOS
    rows = Engine(model).generate(prompts, 12, stop_ids=(eos,), pad_id=PAD)
    for got, whole in zip(rows, free, strict=True):
        end = whole.index(eos) + 1 if eos in whole else len(whole)
        assert got == whole[:end]
    assert len(rows[1]) <= 5


def test_sampling_is_reproducible_for_a_seed(tmp_path):
    _, model = _saved("llama", tmp_path)
    engine, sampler = Engine(model), Sampler(temperature=1.0, top_k=20, top_p=0.9)
    a = engine.generate(_prompts(), 16, sampler, seed=3, pad_id=PAD)
    assert engine.generate(_prompts(), 16, sampler, seed=3, pad_id=PAD) == a
    assert engine.generate(_prompts(), 16, sampler, seed=4, pad_id=PAD) != a


def test_top_k_and_top_p_never_leave_their_set():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(4, 50).astype(np.float32) * 2)
    keys = jax.random.split(jax.random.key(0), 2000)
    for sampler in (Sampler(1.0, top_k=5), Sampler(1.0, top_p=0.6), Sampler(0.7, top_k=8, top_p=0.5)):
        draws = np.asarray(jax.vmap(lambda k, s=sampler: s(logits, k))(keys))  # [draws, rows]
        kept = np.isfinite(
            np.asarray(filter_logits(logits / sampler.temperature, sampler.top_k, sampler.top_p))
        )
        for row in range(4):
            order = np.argsort(-np.asarray(logits[row]))
            allowed = set(order[: sampler.top_k].tolist()) if sampler.top_k else set(range(50))
            if sampler.top_p < 1:
                p = np.exp(np.asarray(logits[row]) / sampler.temperature)
                p = p / p.sum()
                cum = np.cumsum(p[order]) - p[order]
                allowed &= set(order[cum < sampler.top_p].tolist())
            assert set(np.flatnonzero(kept[row]).tolist()) == allowed
            assert set(draws[:, row].tolist()) <= allowed
            assert len(set(draws[:, row].tolist())) > 1  # it does sample


def test_repetition_penalty_matches_transformers(tmp_path):
    ref, model = _saved("llama", tmp_path)
    prompts = _prompts(lengths=(6,))
    with torch.no_grad():
        want = ref.generate(
            torch.tensor(prompts),
            do_sample=False,
            max_new_tokens=16,
            repetition_penalty=1.8,
            pad_token_id=PAD,
        )[:, 6:].tolist()
    got = Engine(model).generate(prompts, 16, Sampler(repetition_penalty=1.8), pad_id=PAD)
    assert got == want
    assert got != Engine(model).generate(prompts, 16, pad_id=PAD)


def _bytes_model(tmp_path):
    """A tiny random Llama over jaxtune's byte tokenizer, saved with it: text in, text out."""
    ref = make_model("llama", vocab_size=257)
    path = tmp_path / "bytes-llama"
    ref.save_pretrained(path)
    jaxtune.load_tokenizer("bytes").save_pretrained(path)
    return str(path)


def test_stop_strings_end_a_completion_which_leaves_them_out(tmp_path):
    path = _bytes_model(tmp_path)
    model, tok = jaxtune.load_pretrained(path), jaxtune.load_tokenizer(path)
    free = jaxtune.generate(model, tok, "hello", max_new_tokens=24)
    stop = free[10:12]
    cut = jaxtune.generate(model, tok, "hello", max_new_tokens=24, stop=[stop])
    assert cut == free[: free.index(stop)]


@pytest.mark.e2e
def test_generate_command_streams_one_prompt_and_writes_jsonl(tmp_path, capsys):
    path = _bytes_model(tmp_path)
    assert generate_main(["--model", path, "--prompt", "abc", "--max_new_tokens", "8"]) == 0
    streamed = capsys.readouterr().out
    model, tok = jaxtune.load_pretrained(path), jaxtune.load_tokenizer(path)
    assert streamed == jaxtune.generate(model, tok, "abc", max_new_tokens=8) + "\n"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "abc"}) + "\n\n" + json.dumps({"prompt": "xyz!"}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["--model", path, "--input", str(prompts), "--output", str(out), "--max_new_tokens", "6"]
    assert generate_main([*args, "--temperature", "0.8", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["abc", "xyz!"]
    for r in rows:
        assert len(r["token_ids"]) == 6 and r["completion"] == tok.decode(
            r["token_ids"], skip_special_tokens=True
        )
    first = out.read_text()
    assert generate_main([*args, "--temperature", "0.8", "--seed", "1"]) == 0
    assert out.read_text() == first  # the seed makes it reproducible

    prompts.write_text(json.dumps({"prompt": "abc"}) + "\n" + '{"text": "no prompt"}\n')
    assert generate_main(args) != 0
    err = capsys.readouterr().err.strip()
    assert f"{prompts}:2:" in err and "prompt" in err and len(err.splitlines()) == 1


def test_cache_mask_is_causal_windowed_and_skips_padding():
    key_mask = jnp.asarray([[0, 1, 1, 1, 1, 0]])
    m = np.asarray(layers.cache_mask_bts(key_mask, 3, 2, window=2))[0]  # queries at slots 3 and 4
    assert m.tolist() == [[False, False, True, True, False, False], [False, False, False, True, True, False]]


@pytest.mark.e2e
def test_generation_sharded_over_a_mesh_equals_one_device(tmp_path, caplog):
    """The model in FSDP x tensor shards and the cache constrained under the same rules: same tokens."""
    from jaxtune import sharding
    from jaxtune.config import DEFAULT_RULES, defaults

    ref = make_model("llama")
    ref.save_pretrained(tmp_path / "m")
    c = defaults()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh = sharding.make_mesh(c, jax.devices())
    sharded = jaxtune.load_pretrained(tmp_path / "m", mesh=mesh, rules=DEFAULT_RULES)
    assert len(sharded.layers.attn.q_proj.kernel[...].sharding.device_set) == 8
    want = Engine(jaxtune.load_pretrained(tmp_path / "m")).generate(_prompts(), 12, pad_id=PAD)
    caplog.set_level(logging.WARNING)
    for unroll in (False, True):
        caplog.clear()
        with jax.log_compiles():
            got = Engine(sharded, mesh, DEFAULT_RULES, unroll=unroll).generate(_prompts(), 12, pad_id=PAD)
        assert got == want
        # The prefill's outputs feed the decode step as its own outputs do: one compile, not two.
        assert _compiles(caplog, "_decode") == 1, unroll


def test_streaming_holds_back_a_partial_character_and_a_stop_strings_start():
    from jaxtune.generate import _settled

    assert _settled("hello wor", ("world!",)) == "hello "
    assert _settled("abc\ufffd", ()) == "abc"
    assert _settled("the end", ("\n\n",)) == "the end"
    assert _settled("the end\n", ("\n\n",)) == "the end"


def test_the_models_eos_ids_from_config_json_end_a_completion(tmp_path):
    """config.json's eos_token_id may be a list (Llama 3's end of text and end of turn): each ends it."""
    from jaxtune.generate import Generator

    path = _bytes_model(tmp_path)
    tok = jaxtune.load_tokenizer(path)
    free = Generator(jaxtune.load_pretrained(path), tok).complete(["hello"], 16)[0].token_ids
    stop = free[5]
    ref = make_model("llama", vocab_size=257, eos_token_id=[256, stop])
    ref.save_pretrained(tmp_path / "eos")
    model = jaxtune.load_pretrained(tmp_path / "eos")
    got = Generator(model, tok).complete(["hello"], 16)[0].token_ids
    assert got == free[: free.index(stop) + 1]


@pytest.mark.e2e
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a choice for XLA's CPU kernels")
def test_16bit_weights_on_cpu_run_unrolled_and_at_least_two_rows(tmp_path):
    # XLA's CPU kernels for a one-row bfloat16 product, and for a scanned layer's bfloat16 weights, are
    # several times slower (benchmarks/README.md): the engine pads one prompt to two rows and unrolls.
    ref = make_model("llama")
    ref.save_pretrained(tmp_path / "llama")
    half = Engine(jaxtune.load_pretrained(tmp_path / "llama", dtype=jnp.bfloat16))
    full = Engine(jaxtune.load_pretrained(tmp_path / "llama"))
    assert half._layout(8)[0].layer_graph is not None and full._layout(8)[0].layer_graph is None
    prompt = _prompts()[0]
    out = half.generate([prompt], 8, pad_id=PAD)
    assert half.stats["batch"] == 2 and half.stats["rows"] == 1 and len(out[0]) == 8
    full.generate([prompt], 8, pad_id=PAD)
    assert full.stats["batch"] == 1
