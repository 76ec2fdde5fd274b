"""Shared fixtures. The real model is loaded once per session (slow tests)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32, eval mode, offline."""
    from dynamics.inputs.models import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only contend (restored afterwards)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` or skip the test when it is absent."""
    from dynamics.inputs.data import shared_data_dir
    path = shared_data_dir(ROOT)
    if path is None:
        pytest.skip("../shared/data is absent")
    return path


# ------------------------------------------------------------------ float64-faithful transformers
# transformers' Llama and GPT-NeoX compute the eager attention softmax, the rotary cos/sin and
# Llama's RMSNorm in float32 whatever the model dtype, so a float64 model is only float32-accurate.
# Test modules that compare engines to 1e-10 use this fixture (``pytestmark``) to keep float64.
from transformers.models.gpt_neox import modeling_gpt_neox as neox_mod  # noqa: E402
from transformers.models.llama import modeling_llama as llama_mod  # noqa: E402
import torch  # noqa: E402


def _eager_attention64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the softmax in the input dtype (not float32)."""
    n_rep = query.shape[1] // key.shape[1]                                       # GQA groups (1 for NeoX)
    key, value = llama_mod.repeat_kv(key, n_rep), llama_mod.repeat_kv(value, n_rep)
    w = query @ key.transpose(2, 3) * scaling                                    # (B, H, T, T)
    if attention_mask is not None:
        w = w + attention_mask[..., : key.shape[-2]]
    w = torch.softmax(w, dim=-1)
    return (w @ value).transpose(1, 2).contiguous(), w


def _rotary64(self, x, position_ids):
    freqs = position_ids[..., None].to(self.inv_freq.dtype) * self.inv_freq     # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def _rmsnorm64(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture
def float64_exact(monkeypatch):
    for mod in (llama_mod, neox_mod):
        monkeypatch.setattr(mod, "eager_attention_forward", _eager_attention64)
    monkeypatch.setattr(llama_mod.LlamaRotaryEmbedding, "forward", _rotary64)
    monkeypatch.setattr(neox_mod.GPTNeoXRotaryEmbedding, "forward", _rotary64)
    monkeypatch.setattr(llama_mod.LlamaRMSNorm, "forward", _rmsnorm64)


