"""Models: tiny test models are deterministic and cover three layouts; the real SmolLM2 loads
offline with the expected architecture and sensible log-probs."""
from types import SimpleNamespace

import pytest
import torch

from dynamics.core.logprobs import pair_logprobs, tokenize_pairs
from dynamics.inputs.models import TINY_ARCHS, load_model, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_are_deterministic(arch):
    a, b, c = tiny_model(arch, seed=0), tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    assert not a.training and a.config.vocab_size == len(tiny_tokenizer())


def test_tiny_layouts():
    gpt2, llama, neox = (tiny_model(a) for a in ("gpt2", "llama", "neox"))
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight          # tied, Conv1D blocks
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert llama.lm_head.weight is llama.model.embed_tokens.weight     # tied, RMSNorm
    assert neox.lm_head.weight is not neox.gpt_neox.embed_in.weight    # untied, biased Linear
    assert neox.gpt_neox.layers[0].attention.query_key_value.bias is not None


def test_load_model_options():
    model, tok = load_model("tiny-gpt2", dtype=torch.float64, attn_implementation="eager", train=True)
    assert model.training and next(model.parameters()).dtype == torch.float64
    assert model.config._attn_implementation == "eager" and tok.pad_token_id is not None
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        load_model("tiny-mamba")
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        load_model("/nonexistent/model.gguf")


@pytest.mark.slow
def test_smollm2_offline(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pairs = [SimpleNamespace(id="paris", prompt="The capital of France is", chosen=" Paris.", rejected=" London."),
             SimpleNamespace(id="sun", prompt="The sun rises in the", chosen=" east", rejected=" west")]
    tp = tokenize_pairs(tok, pairs)
    with torch.no_grad():
        out = pair_logprobs(model, tp)
        loop = [pair_logprobs(model, tp.subset([i]), padding_side="right") for i in range(2)]
    assert (out.chosen.logp > out.rejected.logp).all()          # a pretrained model knows these
    for i in range(2):
        assert out.chosen.logp[i].item() == pytest.approx(loop[i].chosen.logp[0].item(), rel=1e-5, abs=1e-5)
        assert out.rejected.logp[i].item() == pytest.approx(loop[i].rejected.logp[0].item(), rel=1e-5, abs=1e-5)
