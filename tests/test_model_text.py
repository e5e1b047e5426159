"""model/text.py against a tiny random umT5 + an offline WordLevel tokenizer (no hub, well under a second).

The tiny pair is saved in the Wan/diffusers layout (text_encoder/ + tokenizer/), so the same loading code
path runs as for the real Wan2.2 folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from model.text import encode_prompt, load_text_encoder, prompt_embedding

PROMPT = "a person is speaking and listening"
TEXT_LEN = 12
HIDDEN = 16


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *PROMPT.split()])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(root / "tokenizer")

    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=64, d_model=HIDDEN, d_kv=4, num_heads=2, num_layers=1, d_ff=32)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    return root


def test_encode_matches_encoder_and_zero_pads(tiny_root: Path) -> None:
    tokenizer, encoder = load_text_encoder(tiny_root)
    emb = encode_prompt(tokenizer, encoder, PROMPT, TEXT_LEN)
    assert emb.shape == (1, TEXT_LEN, HIDDEN) and emb.dtype == torch.float32
    n = len(PROMPT.split()) + 1  # the words + the closing </s>
    assert torch.count_nonzero(emb[0, n:]) == 0
    assert (emb[0, :n].abs().sum(-1) > 0).all()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == n and ids[0, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        ref = encoder(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(emb[0, :n], ref, rtol=1e-5, atol=1e-5)


def test_truncates_to_text_len(tiny_root: Path) -> None:
    tokenizer, encoder = load_text_encoder(tiny_root)
    emb = encode_prompt(tokenizer, encoder, PROMPT, 4)
    assert emb.shape == (1, 4, HIDDEN) and (emb[0].abs().sum(-1) > 0).all()


def test_demo_path_is_the_seeded_embedding() -> None:
    emb = prompt_embedding(PROMPT, TEXT_LEN, 24)
    want = torch.randn(1, TEXT_LEN, 24, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(emb, want)


def test_cache_written_and_reused_without_encoder(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "enc"
    shutil.copytree(tiny_root, root)
    cache = tmp_path / "cache"
    first = prompt_embedding(PROMPT, TEXT_LEN, HIDDEN, encoder_path=root, cache_dir=cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    assert first.shape == (1, TEXT_LEN, HIDDEN)
    shutil.rmtree(root)  # a cached embedding must not need the encoder at all
    again = prompt_embedding(PROMPT, TEXT_LEN, HIDDEN, encoder_path=root, cache_dir=cache)
    assert torch.equal(first, again)
    with pytest.raises(FileNotFoundError):  # a different key is a cache miss, so it does need the encoder
        prompt_embedding(PROMPT, TEXT_LEN + 1, HIDDEN, encoder_path=root, cache_dir=cache)


def test_missing_path_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.text_encoder_path"):
        load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.text_encoder_path"):
        prompt_embedding(PROMPT, TEXT_LEN, HIDDEN, encoder_path=tmp_path / "nowhere")


def test_flat_folder_layout(tiny_root: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(tiny_root / "text_encoder", flat)
    shutil.copytree(tiny_root / "tokenizer", flat, dirs_exist_ok=True)
    emb = prompt_embedding(PROMPT, TEXT_LEN, HIDDEN, encoder_path=flat)
    assert torch.equal(emb, prompt_embedding(PROMPT, TEXT_LEN, HIDDEN, encoder_path=tiny_root))


def test_hidden_size_mismatch_names_text_dim(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.text_dim"):
        prompt_embedding(PROMPT, TEXT_LEN, HIDDEN * 2, encoder_path=tiny_root, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.pt"))  # a wrong-size embedding is never cached
