"""Model families. Each family module exposes MODEL (Decoder or Encoder), MODEL_TYPES, CLASS_PREFIX,
KEY_PREFIX (the base model's key prefix per model_type), config_from_hf(hf_config), hf_table(cfg, task),
and regexes of checkpoint keys: IGNORED_KEYS (hold no parameter), TIED_KEYS (the tied embedding),
HEAD_KEYS (weights of task heads that a model built for another task drops)."""
