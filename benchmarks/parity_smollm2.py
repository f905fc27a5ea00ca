"""Where float32 differences between jaxtune and transformers come from, on the real SmolLM2-135M.

    .venv/bin/python benchmarks/parity_smollm2.py

Feeds each decoder layer transformers' own input (teacher forcing) and compares its output with
transformers' eager attention; prints, next to it, how far transformers' sdpa attention is from its
eager attention on the same layer, and the final-logit differences: in float32, and with both sides in
float64 (the comparison tests/test_smollm2.py makes), and each side's float32 against its float64.
Needs the test extra (torch).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import jaxtune
from jaxtune import assets
from jaxtune.models import layers

PROMPTS = {
    "question": [{"role": "user", "content": "What is the capital of France?"}],
    "poem": [{"role": "user", "content": "Write a short poem about the sea and the stars."}],
}


def main():
    path = assets.smollm2()
    tokenizer, model = jaxtune.load_tokenizer(path), jaxtune.load_pretrained(path)
    refs = {
        impl: transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=impl
        )
        for impl in ("eager", "sdpa")
    }
    graphdef, stacked = nnx.split(model.layers)
    for name, messages in PROMPTS.items():
        enc = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, tokenize=True
        )
        ids = np.asarray(enc["input_ids"])[None]
        outs = {}
        for impl, ref in refs.items():
            with torch.no_grad():
                out = ref(torch.tensor(ids), output_hidden_states=True)
            outs[impl] = (out.logits.numpy(), [h.numpy() for h in out.hidden_states])
        ours = np.asarray(model(ids))
        eager_logits, hidden = outs["eager"]
        print(
            f"[{name}] {ids.shape[1]} tokens; max |logit diff|: "
            f"jaxtune-eager {np.abs(ours - eager_logits).max():.2e}, "
            f"jaxtune-sdpa {np.abs(ours - outs['sdpa'][0]).max():.2e}, "
            f"sdpa-eager {np.abs(outs['sdpa'][0] - eager_logits).max():.2e}"
        )
        t = ids.shape[1]
        mask = layers.attention_mask_bts(None, None, t, jnp.int32(0))
        worst = 0.0
        for i in range(model.cfg.num_layers - 1):  # the last hidden state is after the final norm
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
            y = np.asarray(block(jnp.asarray(hidden[i]), jnp.arange(t)[None], mask))
            worst = max(worst, np.abs(y - hidden[i + 1]).max() / np.abs(hidden[i + 1]).max())
        print(f"[{name}] worst per-layer difference relative to the layer's largest activation: {worst:.1e}")
        ref64 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
        with torch.no_grad():
            theirs64 = ref64(torch.tensor(ids)).logits.numpy()
        del ref64
        jax.config.update("jax_enable_x64", True)
        try:
            ours64 = np.asarray(jaxtune.load_pretrained(path, dtype=jnp.float64)(ids))
        finally:
            jax.config.update("jax_enable_x64", False)
        sdpa32 = outs["sdpa"][0]
        print(
            f"[{name}] float64: jaxtune-sdpa {np.abs(ours64 - theirs64).max():.2e}; float32 vs float64: "
            f"jaxtune {np.abs(ours - ours64).max():.2e}, sdpa {np.abs(sdpa32 - theirs64).max():.2e}, "
            f"eager {np.abs(eager_logits - theirs64).max():.2e}"
        )


if __name__ == "__main__":
    main()
