"""The data pipeline: sources, formats, chat loss masks, packing, Grain batches (resume, per-process
shards), TFDS without TensorFlow, and bad input."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune
from jaxtune import assets, data
from jaxtune.config import defaults
from jaxtune.data import sources
from jaxtune.data.loader import Batches
from jaxtune.data.packing import pack, pad_rows


def data_config(**changes):
    c = defaults().data
    for k, v in changes.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def smol_tokenizer():
    return jaxtune.load_tokenizer(assets.smollm2())


def test_every_local_file_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a\tb", "label": "pos"}, {"text": "c", "label": "neg"}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "x.csv").write_text('text,label\n"a\tb",pos\nc,neg\n')
    (tmp_path / "x.tsv").write_text("text\tlabel\na\tb\tpos\nc\tneg\n")  # GLUE style: split on the last tab
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    for ext in ("jsonl", "json", "csv", "tsv", "parquet"):
        got = sources.read(str(tmp_path / f"x.{ext}"))
        assert [r for r, _ in got] == rows, ext
    (tmp_path / "x.txt").write_text("hello\nworld\n")
    assert sources.read(str(tmp_path / "x.txt"))[0][0] == {"text": "hello\nworld\n"}
    assert sources.read(str(tmp_path / "x.jsonl"))[1][1] == f"{tmp_path / 'x.jsonl'}:2"


def test_sst2_tsv_from_shared_data(shared_data):
    recs = sources.read(str(shared_data / "sst2" / "dev.tsv"))
    assert len(recs) > 800 and set(recs[0][0]) == {"sentence", "label"}
    assert {r["label"] for r, _ in recs} == {"0", "1"}


@pytest.mark.parametrize(
    "name,content,words",
    [
        ("empty.jsonl", "", ["empty.jsonl", "empty"]),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', ["bad.jsonl:2", "not valid JSON"]),
        ("list.jsonl", '["a"]\n', ["list.jsonl:1", "not an object"]),
        ("short.tsv", "a\tb\tc\n1\t2\n", ["short.tsv:2", "2 tab-separated fields", "3"]),
        ("x.pdf", "%PDF", ["x.pdf", "unknown file type"]),
        ("blank.txt", "  \n", ["blank.txt", "whitespace"]),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, words):
    (tmp_path / name).write_text(content)
    with pytest.raises(sources.DataError) as e:
        sources.read(str(tmp_path / name))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_missing_field_and_missing_files(tmp_path, smol_tokenizer):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Say hi", "input": ""}) + "\n")
    with pytest.raises(data.DataError) as e:
        data.load(data_config(train=str(tmp_path / "a.jsonl"), format="instruction"), smol_tokenizer, 0)
    assert f"{tmp_path / 'a.jsonl'}:1" in str(e.value) and "'output'" in str(e.value)
    with pytest.raises(FileNotFoundError, match="data.train"):
        data.load(data_config(train=str(tmp_path / "nothing*.jsonl")), smol_tokenizer, 0)


def test_chat_loss_is_on_assistant_tokens_only(smol_tokenizer):
    tok = smol_tokenizer
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "Six."},
    ]
    ids, on = data.chat_tokens(tok, messages)
    assert (
        ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    # Token by token: the loss tokens are exactly the two replies, each with its end-of-turn marker.
    runs, current = [], []
    for t, flag in zip(ids, on, strict=True):
        if flag:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == ["It is 4.<|im_end|>", "Six.<|im_end|>"]
    assert "What is 2 + 2?" in tok.decode([t for t, f in zip(ids, on, strict=True) if not f])
    ids_all, on_all = data.chat_tokens(tok, messages, loss_on="all")
    assert ids_all == ids and on_all.all()


def test_alpaca_instruction_rows(shared_data, smol_tokenizer):
    c = data_config(
        train=str(shared_data / "alpaca" / "alpaca_data_first1727.json"), format="instruction", seq_len=256
    )
    recs = data.records(c.train, "data.train", "train")
    assert len(recs) == 1727
    rows = data.rows(recs[:20], smol_tokenizer, c)
    first = recs[0][0]
    reply = smol_tokenizer.decode(rows["tokens"][0][rows["loss"][0] == 1])
    assert reply == first["output"] + "<|im_end|>"
    prompt = smol_tokenizer.decode(rows["tokens"][0][(rows["mask"][0] == 1) & (rows["loss"][0] == 0)])
    assert first["instruction"] in prompt


def test_too_long_examples_are_truncated_or_dropped_and_counted(smol_tokenizer, caplog, tmp_path):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (long, short, long)) + "\n")
    for mode, n in (("truncate", 3), ("drop", 1)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            (rows,), _ = data.load(
                data_config(train=str(path), format="chat", seq_len=64, too_long=mode), smol_tokenizer, 0
            )
        assert len(rows["tokens"]) == n
        assert f"2 of 3 examples were longer than seq_len + 1 = 65 tokens and were {mode}" in caplog.text


def _per_token_nll(model, batch):
    logits = np.asarray(
        model(
            batch["input_ids"], attention_mask=batch["attention_mask"], segment_ids=batch.get("segment_ids")
        )
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * batch["loss_mask"]


@pytest.mark.e2e
def test_packed_and_unpacked_examples_have_the_same_loss():
    from jaxtune.models import presets

    model = jaxtune.pretrained.model_from_config(presets.hf_config("llama-tiny"), seed=0)
    rng = np.random.RandomState(0)
    pieces = []
    for n in (9, 17, 5, 30, 12, 3, 22):
        on = (rng.rand(n) > 0.3).astype(np.int8)
        pieces.append((rng.randint(0, 256, n), on))
    seq_len = 32
    alone = data.to_batch(pad_rows(pieces, seq_len))
    packed_rows = pack(pieces, seq_len)
    packed = data.to_batch(packed_rows)
    assert len(packed_rows["tokens"]) < len(pieces)  # it did pack
    per_alone = _per_token_nll(model, alone).sum(-1)  # one example per row
    nll = _per_token_nll(model, packed)
    seg = packed["segment_ids"]
    order = [(r, s) for r in range(len(seg)) for s in range(1, seg[r].max() + 1)]
    # First-fit keeps examples in order within a row; map each back by its tokens.
    per_packed = {}
    for r, s in order:
        where = np.where(packed_rows["segments"][r] == s)[0]
        key = tuple(packed_rows["tokens"][r][where])
        per_packed[key] = nll[r][seg[r] == s].sum()
    for i, (ids, _) in enumerate(pieces):
        np.testing.assert_allclose(per_packed[tuple(ids)], per_alone[i], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(nll.sum(), per_alone.sum(), rtol=1e-5)
    assert packed["loss_mask"].sum() == alone["loss_mask"].sum()


def _rows(n=37, seq_len=8):
    tokens = np.arange(n * (seq_len + 1)).reshape(n, seq_len + 1).astype(np.int32)
    ones = np.ones_like(tokens, dtype=np.int8)
    return {"tokens": tokens, "mask": ones, "loss": ones}


def test_resume_mid_epoch_gives_the_same_batches():
    rows = _rows()
    straight = Batches(rows, 8, seed=5)
    want = [next(straight)["input_ids"] for _ in range(12)]  # 4 batches an epoch: crosses two epochs
    first = Batches(rows, 8, seed=5)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state()))  # as it travels through the checkpoint
    resumed = Batches(rows, 8, seed=5)
    resumed.restore(state)
    for i in range(6, 12):
        np.testing.assert_array_equal(next(resumed)["input_ids"], want[i])
    epoch0 = np.concatenate(want[:4])[:, 0]
    epoch1 = np.concatenate(want[4:8])[:, 0]
    assert len(set(epoch0)) == 32 and not np.array_equal(epoch0, epoch1)  # reshuffled each epoch


def test_two_processes_read_disjoint_shares_that_cover_each_batch():
    rows = _rows()
    whole = Batches(rows, 8, seed=1)
    p0 = Batches(rows, 8, seed=1, rows=np.arange(0, 4))
    p1 = Batches(rows, 8, seed=1, rows=np.arange(4, 8))
    for _ in range(9):
        a, b, w = next(p0)["input_ids"], next(p1)["input_ids"], next(whole)["input_ids"]
        assert a.shape == b.shape == (4, 8)
        assert not set(a[:, 0]) & set(b[:, 0])
        np.testing.assert_array_equal(np.concatenate([a, b]), w)


def test_tfds_dataset_built_in_the_test_reads_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds

    class TinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(8), "validation": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"example number {i}", "label": i % 2}

    TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    got = sources.read("tfds:tiny_text", split="validation", data_dir=str(tmp_path))
    assert sorted(r["text"] for r, _ in got) == [f"example number {i}" for i in range(3)]
    assert {r["label"] for r, _ in got} == {0, 1}
    tok = jaxtune.pretrained.byte_tokenizer()
    (train,), _ = data.load(data_config(train="tfds:tiny_text", data_dir=str(tmp_path), seq_len=16), tok, 0)
    total = sum(len(f"example number {i}") + 1 for i in range(8))  # bytes and an EOS each
    assert data.to_batch(train)["loss_mask"].sum() == total - 1  # every token after the first is a target
    with pytest.raises(sources.DataError, match="tfds:nope"):
        sources.read("tfds:nope", data_dir=str(tmp_path))
    # The cache key and a prepare's index see the version and the prepared files, not just the name.
    version, files = sources.fingerprint("tfds:tiny_text", "train", str(tmp_path))[2:]
    assert version == "1.0.0" and any(name.endswith(".array_record-00000-of-00001") for name, _, _ in files)


def test_text_rows_cover_every_token_once():
    tok = jaxtune.pretrained.byte_tokenizer()
    recs = [({"text": "abcdefghij"}, "a"), ({"text": "klmno"}, "b")]
    rows = data.text_rows(recs, tok, 4)
    batch = data.to_batch(rows)
    targets = batch["targets"][batch["loss_mask"] > 0]
    assert bytes(targets[targets < 256].astype(np.uint8)) == b"bcdefghijklmno"
    assert (targets == 256).sum() == 2  # the two EOS tokens are targets too
    assert jnp.asarray(batch["input_ids"]).shape[1] == 4


def test_classification_rows_and_label_map_from_sst2(shared_data):
    from jaxtune.data.classify import classification_rows, label_map

    tok = jaxtune.load_tokenizer(assets.minilm())
    c = data_config(text_field="sentence", seq_len=32)
    train = sources.read(str(shared_data / "sst2" / "train.tsv"))[:500]
    dev = sources.read(str(shared_data / "sst2" / "dev.tsv"))[:100]
    labels = label_map(train)
    assert labels.names == ("0", "1") and labels.problem_type == "single_label_classification"
    rows = classification_rows(dev, tok, c, labels)
    assert rows["input_ids"].shape == (100, 32) and rows["labels"].tolist() == [
        int(r["label"]) for r, _ in dev
    ]
    assert (rows["input_ids"][:, 0] == tok.cls_token_id).all() and "token_type_ids" in rows


def test_classification_errors_name_the_record(tmp_path):
    from jaxtune.data.classify import classification_rows, label_map

    tok = jaxtune.load_tokenizer(assets.minilm())
    path = tmp_path / "x.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    )
    labels = label_map(sources.read(str(path)))
    assert labels.names == ("neg", "pos")
    path.write_text(
        json.dumps({"text": "meh", "label": "neutral"}) + "\n" + json.dumps({"label": "pos"}) + "\n"
    )
    with pytest.raises(data.DataError) as e:
        classification_rows(sources.read(str(path)), tok, data_config(), labels)
    assert f"{path}:1" in str(e.value) and "'neutral'" in str(e.value) and "training labels" in str(e.value)
    with pytest.raises(data.DataError, match=f"{path}:2.*no text"):
        classification_rows(sources.read(str(path))[1:], tok, data_config(), labels)


def test_one_label_space_type_serves_the_data_and_the_model(tmp_path):
    """The data's label space is the model task's: a regression is one value named as transformers
    names it, and a task checks that it has a space exactly when it classifies."""
    from jaxtune.data.classify import label_map
    from jaxtune.errors import ModelError
    from jaxtune.models import heads

    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": v}) for t, v in [("a", 0.5), ("b", 2)]))
    space = label_map(sources.read(str(path)))
    assert space == heads.Labels(("LABEL_0",), heads.REGRESSION) and space.num_labels == 1
    task = heads.Task("sequence_classification", space)
    assert (task.labels, task.problem_type, task.num_labels) == (("LABEL_0",), heads.REGRESSION, 1)
    assert heads.Task().labels == () and heads.Task().problem_type == ""
    with pytest.raises(ModelError, match="needs a label space"):
        heads.Task("token_classification")
    with pytest.raises(ModelError, match="takes no labels"):
        heads.Task("causal_lm", space)
    with pytest.raises(ModelError, match="problem_type 'binary'"):
        heads.Labels(("a", "b"), "binary")


def test_mixture_weights_sample_each_source_in_proportion(tmp_path):
    tok = jaxtune.pretrained.byte_tokenizer()
    (tmp_path / "a.txt").write_text("a" * 4000)
    (tmp_path / "b.txt").write_text("b" * 4000)
    c = data_config(train=f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", weights=(3.0, 1.0), seq_len=16)
    parts, _ = data.load(c, tok, 0)
    assert len(parts) == 2
    batches = Batches(parts, 16, seed=0, weights=c.weights)
    first = np.concatenate([next(batches)["input_ids"][:, 0] for _ in range(50)])
    share_a = np.mean(first == ord("a"))
    assert 0.7 < share_a < 0.8, share_a
    with pytest.raises(data.DataError, match="2 weights but data.train names 1"):
        data.load(data_config(train=str(tmp_path / "a.txt"), weights=(1.0, 2.0)), tok, 0)


def test_a_configured_chat_template():
    from jaxtune import train

    c = defaults()
    c.model.tokenizer = "bytes"
    c.model.path = "llama-tiny"
    c.data.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    c.data.chat_template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    tok = train.load_tokenizer(c)
    ids, on = data.chat_tokens(
        tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    assert tok.decode(ids) == "<user>hi\n<assistant>yo\n"
    assert tok.decode([i for i, f in zip(ids, on, strict=True) if f]) == "yo"


def test_tiny_shakespeare_text_rows(shared_data):
    tok = jaxtune.pretrained.byte_tokenizer()
    c = data_config(
        train=str(shared_data / "tiny_shakespeare" / "input.txt"), seq_len=128, eval_fraction=0.05
    )
    (train,), held = data.load(c, tok, 0)
    total = len(train["tokens"]) + len(held["tokens"])
    assert total == -(-(1115394 + 1 - 1) // 128)  # the README's byte count, plus EOS, in rows of 128 targets
    assert 0.04 < len(held["tokens"]) / total < 0.06


def test_tokenized_rows_are_cached_and_invalidated(tmp_path, monkeypatch):
    tok = jaxtune.pretrained.byte_tokenizer()
    text = tmp_path / "a.txt"
    text.write_text("hello world " * 50)
    c = data_config(train=str(text), seq_len=16, eval_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    first = data.load(c, tok, 0)
    assert len(list((tmp_path / "cache").glob("rows-*.npz"))) == 1
    calls = []
    monkeypatch.setattr(data, "_load", lambda *a: calls.append(a))
    again = data.load(c, tok, 0)  # from the cache: no tokenizing
    assert calls == []
    np.testing.assert_array_equal(again[0][0]["tokens"], first[0][0]["tokens"])
    np.testing.assert_array_equal(again[1]["loss"], first[1]["loss"])
    monkeypatch.undo()
    text.write_text("changed text " * 50)  # a changed file is a new key
    data.load(c, tok, 0)
    assert len(list((tmp_path / "cache").glob("rows-*.npz"))) == 2


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["one", "two", "three"], "label": [0, 1, 0]}),
            "validation": datasets.Dataset.from_dict({"text": ["four"], "label": [1]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    got = sources.read(f"hf:{tmp_path / 'saved'}", split="validation")
    assert got == [({"text": "four", "label": 1}, f"hf:{tmp_path / 'saved'}[validation][0]")]
    assert [r["text"] for r, _ in sources.read(f"hf:{tmp_path / 'saved'}")] == ["one", "two", "three"]


def test_first_n_records_and_dedupe(tmp_path, caplog):
    rows = [
        ("good", "pos"),
        ("bad", "neg"),
        ("good", "pos"),
        ("good", "neg"),
        ("fine", "pos"),
        ("bad", "neg"),
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows))
    c = data_config(train=str(path), format="classification")
    assert [r["text"] for r, _ in data.train_groups(c)[0]] == [t for t, _ in rows]
    c.max_train_records = 4
    assert [(r["text"], r["label"]) for r, _ in data.train_groups(c)[0]] == rows[:4]
    c.max_train_records, c.dedupe = 0, True
    with caplog.at_level("INFO"):
        kept = data.train_groups(c)[0]
    # A repeated text goes whatever its label (else it could be trained on and evaluated on); the first stays.
    assert [(r["text"], r["label"]) for r, _ in kept] == [rows[0], rows[1], rows[4]]
    assert [origin for _, origin in kept] == [f"{path}:{i}" for i in (1, 2, 5)]
    assert "dropped 3 repeated records of 6" in caplog.text


def test_chatterbot_records_carry_topic_and_opening_utterance():
    path = os.path.join(assets.chatterbot_corpus(), "food.yml")
    recs = sources.read(path)
    assert {r["topic"] for r, _ in recs} == {"food"}
    assert recs[0][0]["utterance"] == recs[0][0]["messages"][0]["content"] == "do you drink"
