"""GGUF -> HF checkpoint: `export_hf.py MODEL.gguf OUT_DIR` writes a bf16 safetensors checkpoint
with its tokenizer, checks what the copy must keep, and prints its facts as JSON.

Runs with the vLLM virtualenv's Python, which has torch, transformers and gguf
(cortex/toolchain.py: install_test_model).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(2)
kwargs = dict(gguf_file=gguf_path.name)
tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.bfloat16, **kwargs)

config = loaded.config
# The weights are dequantized now; a checkpoint that claims GGUF quantization is wrong.
if hasattr(config, "quantization_config"):
    del config.quantization_config
config.dtype = torch.bfloat16
fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
fresh.load_state_dict(loaded.state_dict(), strict=True)
fresh.eval()
fresh.save_pretrained(out, safe_serialization=True)
tokenizer.save_pretrained(out)

# Check what the copy must keep: tied embeddings and the chat template.
saved = json.loads((out / "config.json").read_text())
assert "quantization_config" not in saved, "quantization_config survived"
reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
embed = reloaded.get_input_embeddings().weight
head = reloaded.get_output_embeddings().weight
tied = bool(saved.get("tie_word_embeddings"))
assert tied == (embed.data_ptr() == head.data_ptr()), "tie_word_embeddings disagrees with weights"
assert torch.equal(head, loaded.get_output_embeddings().weight), "lm_head changed in the copy"
template = AutoTokenizer.from_pretrained(out).chat_template
assert template and template == tokenizer.chat_template, "the chat template did not survive"
print(
    json.dumps(
        {
            "tie_word_embeddings": tied,
            "architectures": saved.get("architectures"),
            "parameters": sum(p.numel() for p in reloaded.parameters()),
        }
    )
)
