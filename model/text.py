"""The fixed text prompt's embedding: umT5 from a local Wan2.2 folder, or the demo's seeded stand-in.

StreamAvatar conditions every clip on ONE fixed prompt ("a person is speaking and listening"), so the text
encoder only ever runs once per (encoder, prompt, text_len). umT5-XXL is ~11 GB in bf16; we encode once and
keep the [1, text_len, text_dim] result as a small .pt in a cache folder, so later runs never load it again.

The encoding reproduces diffusers' ``WanPipeline._get_t5_prompt_embeds``: clean the prompt, tokenize padded
to ``text_len`` (truncating, with the closing ``</s>``), run the encoder with the attention mask, keep the
first ``mask.sum()`` hidden states and set every padded position to exactly zero. The zeros matter: the Wan
DiT was trained on such embeddings and its cross-attention has no text mask, so padding must carry nothing.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CONFIG_KEY = "model.text_encoder_path"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
DEMO_SEED = 1234  # the seed of tasks/common/models.py fixed_prompt; both must give the same tensor


def _find_folders(path: str | Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder): a Wan/diffusers model root, or one folder holding both."""
    root = Path(path).expanduser()
    candidates = [(root / "text_encoder", root / "tokenizer"), (root, root)]
    for enc, tok in candidates:
        if (enc / "config.json").is_file() and any((tok / f).is_file() for f in TOKENIZER_FILES):
            return enc, tok
    raise FileNotFoundError(
        f"no umT5 text encoder at {root} ({CONFIG_KEY}): expected text_encoder/config.json and tokenizer/ "
        f"(one of {', '.join(TOKENIZER_FILES)}) under it, or both in the folder itself"
    )


def load_text_encoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """(tokenizer, UMT5EncoderModel) from a LOCAL folder; never touches a hub (local_files_only)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    enc_dir, tok_dir = _find_folders(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    encoder = UMT5EncoderModel.from_pretrained(str(enc_dir), dtype=dtype, local_files_only=True)
    return tokenizer, encoder.to(device).eval()


def clean_prompt(text: str) -> str:
    """diffusers' prompt_clean (ftfy is optional there and absent here): unescape HTML, squeeze whitespace."""
    try:
        import ftfy
    except ImportError:  # optional, as in diffusers: without it the text is only unescaped and squeezed
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompt(tokenizer: Any, encoder: Any, prompt: str, text_len: int) -> torch.Tensor:
    """[1, text_len, hidden] float32 on CPU: the prompt's hidden states, then exact zeros up to text_len."""
    batch = tokenizer(
        [clean_prompt(prompt)], padding="max_length", max_length=text_len, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = int(mask.gt(0).sum())
    device = next(encoder.parameters()).device
    hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    out = torch.zeros(1, text_len, hidden.shape[-1], dtype=torch.float32)
    out[0, :n] = hidden[0, :n].float().cpu()
    return out


def seeded_prompt(text_len: int, text_dim: int) -> torch.Tensor:
    """The demo's stand-in: a fixed seeded tensor, identical to tasks/common/models.py ``fixed_prompt``."""
    return torch.randn(1, text_len, text_dim, generator=torch.Generator().manual_seed(DEMO_SEED))


def seeded_extension(base: torch.Tensor, prompt: str) -> torch.Tensor:
    """The demo's stand-in for a prompt that extends the base one (an action's, model/interaction.py): the
    base embedding's first half kept (the words they share, as umT5's first tokens would be), the rest a
    tensor seeded by the prompt's text (stable across runs and machines)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    out = base.clone()
    keep = base.shape[1] // 2
    out[:, keep:] = torch.randn(base.shape[0], base.shape[1] - keep, base.shape[2],
                                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return out


def action_embeddings(
    base_prompt: str,
    text_len: int,
    text_dim: int,
    encoder_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Each action's prompt embedding [1, text_len, text_dim] (model/interaction.py ``action_prompt``); idle is
    the base prompt's. With umT5 the prompts not in the cache are encoded with ONE load of the encoder (and
    cached); the demo extends the seeded base (``seeded_extension``)."""
    from model.interaction import ACTIONS, action_prompt

    prompts = {name: action_prompt(base_prompt, name) for name in ACTIONS}
    if encoder_path is None:
        base = seeded_prompt(text_len, text_dim)
        return {n: base if p == base_prompt else seeded_extension(base, p) for n, p in prompts.items()}
    encoded: dict[str, torch.Tensor] = {}
    missing = []
    for prompt in dict.fromkeys(prompts.values()):
        cached = Path(cache_dir) / f"text_{cache_key(encoder_path, prompt, text_len, dtype)}.pt" if cache_dir else None
        if cached is not None and cached.is_file():
            encoded[prompt] = prompt_embedding(prompt, text_len, text_dim, encoder_path, cache_dir, dtype=dtype)
        else:
            missing.append((prompt, cached))
    if missing:
        log.info("encoding %d prompt(s) with the text encoder at %s", len(missing), encoder_path)
        tokenizer, encoder = load_text_encoder(encoder_path, dtype=dtype, device=device)
        for prompt, cached in missing:
            emb = encode_prompt(tokenizer, encoder, prompt, text_len)
            _check_dim(emb, text_dim, str(encoder_path))
            if cached is not None:
                _save_atomic(emb, cached)
            encoded[prompt] = emb
        del encoder
    return {n: encoded[p] for n, p in prompts.items()}


def cache_key(encoder_path: str | Path, prompt: str, text_len: int, dtype: torch.dtype) -> str:
    """Hash of what determines the embedding; the resolved path so relative and absolute spellings agree."""
    resolved = str(Path(encoder_path).expanduser().resolve())
    blob = json.dumps([resolved, prompt, int(text_len), str(dtype)])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _check_dim(emb: torch.Tensor, text_dim: int, source: str) -> None:
    if emb.shape[-1] != text_dim:
        raise ValueError(
            f"the text encoder at {source} has hidden size {emb.shape[-1]} but model.text_dim is {text_dim} "
            f"(umT5-XXL: 4096)"
        )


def _save_atomic(tensor: torch.Tensor, dest: Path) -> None:
    """tmp file in the same folder + os.replace, so a crash or a concurrent run never leaves half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensor, f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prompt_embedding(
    prompt: str,
    text_len: int,
    text_dim: int,
    encoder_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """[1, text_len, text_dim] float32: seeded when no encoder is set, else umT5 (cached in cache_dir).

    A cached file is used without loading (or even finding) the encoder; ``dtype``/``device`` only say how
    to run the encoder when there is no cache (bf16 on a GPU for the real 11 GB umT5-XXL).
    """
    if encoder_path is None:
        return seeded_prompt(text_len, text_dim)
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"text_{cache_key(encoder_path, prompt, text_len, dtype)}.pt"
        if cached.is_file():
            emb = torch.load(cached, map_location="cpu", weights_only=True)
            _check_dim(emb, text_dim, f"{encoder_path} (cached in {cached})")
            log.info("prompt embedding from cache %s", cached)
            return emb
    log.info("encoding the prompt with the text encoder at %s", encoder_path)
    tokenizer, encoder = load_text_encoder(encoder_path, dtype=dtype, device=device)
    emb = encode_prompt(tokenizer, encoder, prompt, text_len)
    del encoder
    _check_dim(emb, text_dim, str(encoder_path))
    if cached is not None:
        _save_atomic(emb, cached)
    return emb
