"""Model families. Each family module exposes MODEL_TYPES, config_from_hf(hf_config), hf_table(cfg),
IGNORED_KEYS (regexes of checkpoint keys that hold no parameter) and TIED_KEYS."""
