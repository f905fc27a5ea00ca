"""Data at scale: prepared ArrayRecord shards (the same rows as the in-memory path, resumable), streaming
with exact resume, per-process shares, windowed packing, bounded memory, source fingerprints, and bad
input."""

import collections
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import jaxtune
from jaxtune import assets, data, pretrained
from jaxtune.config import defaults
from jaxtune.data import prepare, shards, workers
from jaxtune.data.loader import Batches
from jaxtune.data.packing import Packer, pack
from jaxtune.data.stream import StreamBatches
from jaxtune.errors import DataError

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


def data_config(**changes):
    c = defaults().data
    for k, v in changes.items():
        c[k] = v
    return c


def write_texts(folder, n_files: int, docs: int, seed: int = 0, repeats: int = 0) -> str:
    """JSONL files of generated documents (with ``repeats``, every such-th one a copy of an earlier
    one); returns their glob."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for f in range(n_files):
        with open(os.path.join(folder, f"part{f}.jsonl"), "w") as out:
            lines = []
            for d in range(docs):
                words = rng.choice(WORDS, int(rng.integers(3, 60)))
                lines.append(json.dumps({"text": f"file {f} doc {d}: " + " ".join(words)}) + "\n")
                if repeats and d % repeats == repeats - 1:
                    lines[-1] = lines[int(rng.integers(0, d))]
            out.writelines(lines)
    return os.path.join(folder, "*.jsonl")


@pytest.fixture(scope="module")
def bytes_tokenizer():
    return pretrained.byte_tokenizer()


@pytest.fixture(scope="module")
def smol_tokenizer():
    return jaxtune.load_tokenizer(assets.smollm2())


def same_rows(memory: dict, prepared) -> None:
    got = data.take(prepared, np.arange(data.size(prepared)))
    assert sorted(got) == sorted(memory)
    for key in memory:
        np.testing.assert_array_equal(got[key], memory[key], err_msg=key)


def load_both(c, tokenizer, out, workers=1, shard_rows=0):
    memory_parts, memory_eval = data.load(c, tokenizer, 3)
    index = prepare.Prepare(c, tokenizer, str(out), 3, workers, shard_rows).run(progress_bar=False)
    c = data_config(**{**c.to_dict(), "train": f"prepared:{out}", "eval": "", "eval_fraction": 0.0})
    parts, held = data.load(c, tokenizer, 3)
    return index, (memory_parts, memory_eval), (parts, held)


def test_prepared_text_rows_equal_the_in_memory_rows(tmp_path, bytes_tokenizer, monkeypatch):
    monkeypatch.setattr(workers, "CHUNK_RECORDS", 8)
    files = write_texts(tmp_path / "src", 3, 40)
    c = data_config(train=files, seq_len=32, eval_fraction=0.1, dedupe=True, max_train_records=100)
    index, (mem, mem_eval), (parts, held) = load_both(c, bytes_tokenizer, tmp_path / "out", shard_rows=20)
    assert len(parts) == 1 and len(index["parts"][0]["shards"]) > 2  # several shards were written
    same_rows(mem[0], parts[0])
    same_rows(mem_eval, held)
    assert index["records"] == 100 and index["rows"] == data.size(mem[0])
    # One document held out by rows, as the in-memory path does for a single text.
    single = data_config(train=os.path.join(tmp_path / "src", "part0.jsonl"), seq_len=32, eval_fraction=0.2)
    single.max_train_records = 1
    _, (mem, mem_eval), (parts, held) = load_both(single, bytes_tokenizer, tmp_path / "one")
    same_rows(mem[0], parts[0])
    same_rows(mem_eval, held)
    # data.eval given: the held-out records are left out of training and eval is data.eval's alone.
    c.eval = os.path.join(tmp_path / "src", "part2.jsonl")
    _, (mem, mem_eval), (parts, held) = load_both(c, bytes_tokenizer, tmp_path / "with_eval")
    same_rows(mem[0], parts[0])
    same_rows(mem_eval, held)


def test_prepared_chat_rows_equal_the_in_memory_rows_with_worker_processes(tmp_path, smol_tokenizer):
    """Packed chat rows (loss on the assistant's turns) of chatterbot-corpus, one part per weighted
    source, made by two tokenizer processes: the same rows as tokenizing in memory."""
    corpus = assets.chatterbot_corpus()
    train = ",".join(os.path.join(corpus, f) for f in ("ai.yml", "computers.yml", "science.yml"))
    c = data_config(
        train=train,
        format="chat",
        packing=True,
        pack_window=4,
        seq_len=128,
        weights=(1.0, 1.0, 2.0),
        eval_fraction=0.1,
    )
    index, (mem, mem_eval), (parts, held) = load_both(c, smol_tokenizer, tmp_path / "out", workers=2)
    assert len(parts) == 3 and index["packing"]
    for m, p in zip(mem, parts, strict=True):
        same_rows(m, p)
    same_rows(mem_eval, held)
    assert data.to_batch(data.take(parts[0], [0, 1]))["loss_mask"].sum() > 0


@pytest.mark.parametrize("processes", [1, 2])
def test_an_interrupted_prepare_resumes_to_the_same_index(processes, tmp_path, bytes_tokenizer, monkeypatch):
    """Killed between shards (with repeated records dropped, and, with two tokenizer processes, chunks
    in flight past the checkpoint): the resumed prepare ends with the shards, the index and the rows
    of an uninterrupted one, which are the in-memory rows."""
    files = write_texts(tmp_path / "src", 2, 150, repeats=5)
    c = data_config(train=files, seq_len=24, eval_fraction=0.05, dedupe=True)
    monkeypatch.setattr(workers, "CHUNK_RECORDS", 16)
    prepare_ = lambda out: prepare.Prepare(c, bytes_tokenizer, str(out), 0, processes, 40)  # noqa: E731
    whole = prepare_(tmp_path / "whole").run(progress_bar=False)
    assert whole["records"] == 300
    write = shards.write_shard
    written = []

    def killed_after_five(path, rows):
        if len(written) == 5:
            raise KeyboardInterrupt  # as a kill between two shards would leave it
        written.append(path)
        return write(path, rows)

    monkeypatch.setattr(shards, "write_shard", killed_after_five)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare_(out).run(progress_bar=False)
    assert (out / prepare.PROGRESS).exists() and not (out / shards.INDEX).exists()
    assert list(out.glob("seen-*.npy"))  # the dedupe digests of the records before the checkpoint
    (out / "train0-00099.arrayrecord.tmp").write_bytes(b"half a shard")  # a write cut short
    monkeypatch.setattr(shards, "write_shard", write)
    resumed = prepare_(out).run(progress_bar=False)
    assert resumed == whole
    (memory,), memory_eval = data.load(c, bytes_tokenizer, 0)
    c_prepared = data_config(train=f"prepared:{out}", seq_len=24)
    (rows,), held = data.load(c_prepared, bytes_tokenizer, 0)
    same_rows(memory, rows)
    same_rows(memory_eval, held)
    for name in (tmp_path / "whole").iterdir():
        if name.name != ".lock":  # who held the folder, and when
            assert (out / name.name).read_bytes() == name.read_bytes(), name.name
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))

    def no_work(*a, **k):
        raise AssertionError("a finished prepare tokenized again")

    monkeypatch.setattr(prepare, "Tokenizers", no_work)
    assert prepare_(out).run(progress_bar=False) == whole


def test_a_prepare_stopped_before_its_first_progress_resumes(tmp_path, bytes_tokenizer, monkeypatch):
    """Shards are renamed into place before the first progress is saved: a kill in that window leaves a
    folder the rerun still takes as its own, and finishes to the index of an uninterrupted prepare."""
    c = data_config(train=write_texts(tmp_path / "src", 2, 150), seq_len=24)
    prepare_ = lambda out: prepare.Prepare(c, bytes_tokenizer, str(out), 0, 1, 20)  # noqa: E731
    whole = prepare_(tmp_path / "whole").run(progress_bar=False)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare.Prepare, "_save_progress", killed)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare_(out).run(progress_bar=False)
    assert list(out.glob("train0-*.arrayrecord")) and not (out / shards.INDEX).exists()
    monkeypatch.undo()
    assert prepare_(out).run(progress_bar=False) == whole
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))


def _prepared(tmp_path, tokenizer, docs=200):
    files = write_texts(tmp_path / "src", 2, docs)
    c = data_config(train=files, seq_len=16)
    prepare.Prepare(c, tokenizer, str(tmp_path / "out"), 0, 1, 64).run(progress_bar=False)
    c.train = f"prepared:{tmp_path / 'out'}"
    (rows,), _ = data.load(c, tokenizer, 0)
    return rows


def test_resume_mid_epoch_and_disjoint_shares_from_prepared_shards(tmp_path, bytes_tokenizer):
    rows = _prepared(tmp_path, bytes_tokenizer, docs=50)
    per_epoch = data.size(rows) // 8
    straight = Batches(rows, 8, seed=2)
    want = [next(straight)["input_ids"] for _ in range(per_epoch + 3)]  # into the second epoch
    first = Batches(rows, 8, seed=2)
    for _ in range(per_epoch - 2):
        next(first)
    resumed = Batches(rows, 8, seed=2)
    resumed.restore(json.loads(json.dumps(first.state())))
    for i in range(per_epoch - 2, per_epoch + 3):
        np.testing.assert_array_equal(next(resumed)["input_ids"], want[i])
    p0, p1 = Batches(rows, 8, seed=2, rows=np.arange(4)), Batches(rows, 8, seed=2, rows=np.arange(4, 8))
    epoch = [np.concatenate([next(p0)["input_ids"], next(p1)["input_ids"]]) for _ in range(per_epoch)]
    np.testing.assert_array_equal(np.concatenate(epoch), np.concatenate(want[:per_epoch]))
    # Each row at most once in the epoch (as a multiset: generated rows may repeat).
    every = collections.Counter(
        r.tobytes() for r in data.take(rows, np.arange(data.size(rows)))["tokens"][:, :-1]
    )
    epoch_rows = collections.Counter(r.tobytes() for r in np.concatenate(epoch))
    assert sum(epoch_rows.values()) == per_epoch * 8 and not epoch_rows - every


def test_streaming_resumes_exactly_and_processes_read_their_own_files(tmp_path, bytes_tokenizer):
    files = write_texts(tmp_path / "src", 4, 12)
    c = data_config(train=files, seq_len=32, format="text", streaming=True)
    whole = StreamBatches(c, bytes_tokenizer, 4, seed=1, workers=1)
    want = [next(whole)["input_ids"] for _ in range(40)]  # a few epochs of the 4 small files
    first = StreamBatches(c, bytes_tokenizer, 4, seed=1, workers=1)
    for _ in range(17):
        next(first)
    state = json.loads(json.dumps(first.state()))
    resumed = StreamBatches(c, bytes_tokenizer, 4, seed=1, workers=1)
    resumed.restore(state)
    for i in range(17, 40):
        np.testing.assert_array_equal(next(resumed)["input_ids"], want[i])
    # One long document (a .txt file is one record): the state stays about a batch, not the file.
    (tmp_path / "book.txt").write_text(" ".join(WORDS * 2000))
    book = StreamBatches(
        data_config(train=str(tmp_path / "book.txt"), seq_len=32, streaming=True), bytes_tokenizer, 4, 1
    )
    for _ in range(5):
        next(book)
    assert len(json.dumps(book.state())) < 4 * 33 * 3 * 6  # pending rows < one batch of 3 arrays
    again = StreamBatches(
        data_config(train=str(tmp_path / "book.txt"), seq_len=32, streaming=True), bytes_tokenizer, 4, 1
    )
    again.restore(json.loads(json.dumps(book.state())))
    np.testing.assert_array_equal(next(again)["input_ids"], next(book)["input_ids"])
    # Two processes: disjoint files, and together every file's documents.
    texts = []
    for p in range(2):
        stream = StreamBatches(c, bytes_tokenizer, 4, seed=1, reader=(p, 2), workers=1)
        ids = np.concatenate([next(stream)["input_ids"].reshape(-1) for _ in range(60)])
        texts.append(bytes(ids[ids < 256].astype(np.uint8)).decode(errors="replace"))
    got = [{tuple(map(int, m)) for m in re.findall(r"file (\d) doc (\d+):", t)} for t in texts]
    assert got == [{(f, d) for f in files for d in range(12)} for files in ((0, 2), (1, 3))]
    # Resuming on other files, or from a state that is not a stream's: one line each.
    (tmp_path / "src" / "part0.jsonl").write_text('{"text": "changed"}\n')
    with pytest.raises(DataError, match=r"the files of data.train changed since the checkpoint"):
        StreamBatches(c, bytes_tokenizer, 4, seed=1, workers=1).restore(state)
    with pytest.raises(DataError, match=r"not a stream's"):
        StreamBatches(c, bytes_tokenizer, 4, seed=1, workers=1).restore(Batches(_rows_of(8), 4, 0).state())


def _rows_of(n: int) -> dict:
    tokens = np.arange(n * 9).reshape(n, 9).astype(np.int32)
    return {"tokens": tokens, "mask": np.ones_like(tokens, np.int8), "loss": np.ones_like(tokens, np.int8)}


def test_streaming_packed_chat_resumes_exactly(tmp_path, smol_tokenizer):
    corpus = assets.chatterbot_corpus()
    train = ",".join(os.path.join(corpus, f) for f in ("food.yml", "computers.yml"))
    c = data_config(train=train, format="chat", packing=True, pack_window=3, seq_len=64, streaming=True)
    want = [
        next(s)["targets"] for s in [StreamBatches(c, smol_tokenizer, 2, 0, workers=1)] for _ in range(30)
    ]
    first = StreamBatches(c, smol_tokenizer, 2, 0, workers=1)
    for _ in range(11):
        next(first)
    resumed = StreamBatches(c, smol_tokenizer, 2, 0, workers=1)
    resumed.restore(json.loads(json.dumps(first.state())))
    for i in range(11, 30):
        np.testing.assert_array_equal(next(resumed)["targets"], want[i])


def test_windowed_packing_is_first_fit_over_the_last_rows():
    rng = np.random.default_rng(0)
    pieces = [(np.full(n, i, np.int32), np.ones(n, np.int8)) for i, n in enumerate(rng.integers(1, 30, 300))]
    full = pack(pieces, 31)
    assert all(np.array_equal(full[k], pack(pieces, 31, window=10_000)[k]) for k in full)
    windowed = pack(pieces, 31, window=4)
    ids = windowed["tokens"][windowed["mask"] > 0]
    assert sorted(np.unique(ids)) == list(range(300))  # every example once, never split
    assert np.bincount(ids).tolist() == [len(p[0]) for p in pieces]
    packer = Packer(31, window=4)
    for ids_, on in pieces:
        packer.add(ids_, on)
        assert len(packer.open) <= 4
    fill = lambda rows: rows["mask"].mean()  # noqa: E731
    assert fill(windowed) > 0.8 * fill(full)


@pytest.mark.e2e
def test_memory_stays_flat_over_a_corpus_ten_times_larger(tmp_path):
    """Training batches from 20 MB and from 200 MB of prepared rows: the reading process's peak RSS
    differs by less than 60 MB (the in-memory path would hold the whole corpus)."""
    script = textwrap.dedent(
        """
        import resource, sys
        import numpy as np
        from jaxtune.data import shards
        from jaxtune.data.loader import Batches
        folder, count = sys.argv[1], int(sys.argv[2])
        rows = shards.PreparedRows(folder, [dict(file=f"s{i}.arrayrecord", rows=count, bytes=int(b))
                                            for i, b in enumerate(sys.argv[3:])], False, 1025)
        batches = Batches([rows], 16, seed=0)
        for _ in range(200):
            next(batches)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    peaks = []
    for mb in (20, 200):
        folder = tmp_path / f"c{mb}"
        folder.mkdir()
        per_shard = 1000  # rows of 1025 tokens: 6 MB a shard
        sizes = []
        for i in range(mb * (1 << 20) // (per_shard * 1025 * 6)):
            tokens = np.random.default_rng(i).integers(0, 49152, (per_shard, 1025)).astype(np.int32)
            ones = np.ones_like(tokens, np.int8)
            sizes.append(
                shards.write_shard(
                    str(folder / f"s{i}.arrayrecord"), dict(tokens=tokens, mask=ones, loss=ones)
                )
            )
        out = subprocess.run(
            [sys.executable, "-c", script, str(folder), str(per_shard), *map(str, sizes)],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.append(int(out.stdout.split()[-1]))
        for f in folder.iterdir():
            f.unlink()
    print("peak RSS (MB)", peaks)
    assert peaks[1] - peaks[0] < 60, peaks


def test_bad_prepared_data_is_one_line_naming_the_file(tmp_path, bytes_tokenizer, smol_tokenizer):
    rows = _prepared(tmp_path, bytes_tokenizer, docs=60)
    assert data.size(rows) > 0
    out = tmp_path / "out"
    c = data_config(train=f"prepared:{out}", seq_len=16)
    with pytest.raises(DataError, match=r"index.json: prepared with tokenizer another tokenizer.*prepare"):
        data.load(c, smol_tokenizer, 0)
    c.seq_len = 32
    with pytest.raises(DataError, match=r"prepared with seq_len 16, but the config has data.seq_len = 32"):
        data.load(c, bytes_tokenizer, 0)
    c.seq_len = 16
    shard = sorted(out.glob("*.arrayrecord"))[0]
    blob = bytearray(shard.read_bytes())
    shard.write_bytes(blob[:-100])  # truncated
    with pytest.raises(DataError, match=rf"{shard}: corrupt shard .*bytes, the index says"):
        data.load(c, bytes_tokenizer, 0)
    blob[100:400] = b"\xff" * 300  # damaged in place: found when read
    shard.write_bytes(blob)
    with pytest.raises(DataError, match=rf"{shard}.*corrupt shard"):
        (part,), _ = data.load(c, bytes_tokenizer, 0)
        data.take(part, np.arange(data.size(part)))
    long_chats = data_config(train=os.path.join(assets.chatterbot_corpus(), "ai.yml"), format="chat")
    long_chats.seq_len, long_chats.too_long = 8, "drop"
    with pytest.raises(DataError, match=r"every example was dropped as too long; raise data.seq_len"):
        prepare.Prepare(long_chats, smol_tokenizer, str(tmp_path / "long"), 0, 1).run(progress_bar=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    empty = data_config(train=str(tmp_path / "empty.jsonl"), seq_len=16)
    with pytest.raises(DataError, match=r"empty.jsonl: holds no records"):
        prepare.Prepare(empty, bytes_tokenizer, str(tmp_path / "e"), 0, 1).run(progress_bar=False)
    with pytest.raises(DataError, match=r"other-dir/index.json: not found; prepare the data first"):
        data.load(data_config(train=f"prepared:{tmp_path / 'other-dir'}"), bytes_tokenizer, 0)


def test_rebuilt_hugging_face_dataset_gets_a_new_cache_key(tmp_path, bytes_tokenizer):
    import datasets

    saved = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(saved)
    c = data_config(train=f"hf:{saved}", seq_len=8, cache_dir=str(tmp_path / "cache"))
    first = data._cache_key(c, bytes_tokenizer, 0, None)
    datasets.Dataset.from_dict({"text": ["three", "four"]}).save_to_disk(saved + "2")
    os.rename(saved, saved + "-old")
    os.rename(saved + "2", saved)
    assert data._cache_key(c, bytes_tokenizer, 0, None) != first


@pytest.mark.e2e
def test_a_prepare_killed_mid_run_resumes_to_the_same_index(tmp_path):
    """The real command, SIGKILLed once a few shards are on disk, then run again: the same shards and
    index as a run that was never stopped."""
    files = write_texts(tmp_path / "src", 4, 2000)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def command(out):
        return [
            sys.executable, "-m", "jaxtune.prepare", "--config", os.path.join(root, "configs", "smoke.py"),
            "--out", str(out), "--rows_per_shard=500", "--workers=1",
            f"--config.data.train={files}", "--config.data.seq_len=64",
        ]  # fmt: skip

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(out.glob("train0-*.arrayrecord"))) < 3 and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (out / shards.INDEX).exists(), "the prepare finished before it could be killed"
    subprocess.run(command(out), env=env, check=True, capture_output=True)
    whole = json.loads((tmp_path / "whole" / shards.INDEX).read_text())
    assert json.loads((out / shards.INDEX).read_text()) == whole and len(whole["parts"][0]["shards"]) > 5
    for shard in whole["parts"][0]["shards"] + whole["eval"]["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "whole" / shard["file"]).read_bytes()


def test_a_url_out_is_one_line_not_a_local_folder_of_that_name(tmp_path, bytes_tokenizer, monkeypatch):
    from jaxtune.errors import UsageError

    monkeypatch.chdir(tmp_path)
    c = data_config(train=write_texts(tmp_path / "src", 1, 5), seq_len=16)
    with pytest.raises(UsageError, match=r"--out gs://b/x: prepare writes a local folder"):
        prepare.Prepare(c, bytes_tokenizer, "gs://b/x", 0, 1, 64).run(progress_bar=False)
    assert not (tmp_path / "gs:").exists()
