"""AudioDiT against diffusers' WanTransformer3DModel, the Wan loader, the audio modules, attention modes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from model.attention import CausalLayout
from model.dit import AudioDiT, DiTSpec, cast_keeping_fp32, load_wan_transformer

WAN_KW = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6,
)  # fmt: skip
AUDIO_DIM = 24


def _wan(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**WAN_KW).eval()


def _inputs(frames: int = 7, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, frames, generator=g) * 1000
    t[:, 0] = 0  # the clean reference frame
    return dict(
        latents=torch.randn(batch, 16, frames, 8, 8, generator=g),
        timestep=t,
        text=torch.randn(batch, 5, 32, generator=g),
        audio_talk=torch.randn(batch, frames, 10, AUDIO_DIM, generator=g),
        audio_listen=torch.randn(batch, frames, 10, AUDIO_DIM, generator=g),
    )


def _ours_from(wan: WanTransformer3DModel) -> AudioDiT:
    model = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM)).eval()
    missing, unexpected = model.load_state_dict(wan.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == model.audio_parameter_names()
    return model


def _per_token(timestep: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    return timestep[:, :, None].expand(-1, -1, tokens_per_frame).flatten(1)


@torch.no_grad()
def test_teacher_equals_diffusers_wan_with_audio_at_init():
    wan = _wan()
    ours = _ours_from(wan)
    x = _inputs()
    expected = wan(x["latents"], _per_token(x["timestep"], 16), x["text"]).sample  # Wan2.2-TI2V expanded timesteps
    got = ours(**x, attention="bidirectional")
    assert got.shape == expected.shape == x["latents"].shape
    assert (got - expected).abs().max().item() <= 1e-5
    # a scalar timestep per sample (Wan2.1 style) agrees as well
    t = torch.tensor([500.0, 20.0])
    assert (ours(x["latents"], t, x["text"]) - wan(x["latents"], t, x["text"]).sample).abs().max() <= 1e-5


@torch.no_grad()
def test_audio_attentions_are_zero_at_init_and_act_once_trained():
    ours = _ours_from(_wan())
    x = _inputs()
    base = ours(**x)
    silent = ours(**{**x, "audio_talk": torch.zeros_like(x["audio_talk"]), "audio_listen": None})
    assert torch.equal(base, silent)  # zero-initialised output projections: audio has no effect yet
    for block in ours.blocks:
        torch.nn.init.normal_(block.audio_attn.to_out.weight, std=0.2)
    talk_changed = ours(**{**x, "audio_talk": x["audio_talk"] * 2})
    listen_changed = ours(**{**x, "audio_listen": x["audio_listen"] * 2})
    assert (talk_changed - base).abs().max() > 1e-3  # Audio Attention reads the talking stream
    assert torch.equal(listen_changed, ours(**x))  # Interact Audio Attention is still zero: listening inert
    # frame-local: the tokens of frame f read only frame f's audio
    attn = ours.blocks[0].audio_attn
    tokens = torch.randn(2, 7, 16, 32)
    audio = ours.embed_audio(x["audio_talk"])
    moved = audio.clone()
    moved[:, 5] += 1.0
    diff = (attn(tokens, moved) - attn(tokens, audio)).abs().amax(dim=(0, 2, 3))
    assert diff[5] > 1e-3 and torch.all(diff[torch.arange(7) != 5] == 0)


def test_wan_loader_round_trips_a_saved_diffusers_model(tmp_path):
    wan = _wan(3)
    wan.save_pretrained(tmp_path / "Wan-tiny" / "transformer")
    model = load_wan_transformer(tmp_path / "Wan-tiny", audio_dim=AUDIO_DIM)
    assert model.spec.num_layers == 2 and model.spec.dim == 32 and model.spec.audio_dim == AUDIO_DIM
    x = _inputs()
    with torch.no_grad():
        expected = wan(x["latents"], _per_token(x["timestep"], 16), x["text"]).sample
        got = model(**x)
    assert (got - expected).abs().max().item() <= 1e-5
    # nothing left on the meta device, and the audio modules were built with a zero output
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.count_nonzero(b.audio_attn.to_out.weight) == 0 for b in model.blocks)
    # bf16 loading: bf16 weights, except what diffusers keeps in float32; the forward runs and stays close
    bf16 = load_wan_transformer(tmp_path / "Wan-tiny" / "transformer", AUDIO_DIM, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in bf16.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.scale_shift_table"] == dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    # ... with their float32 values exactly, not rounded through bf16 (the rest is the bf16 of the saved value)
    full = {n: p for n, p in model.named_parameters()}
    for name, p in bf16.named_parameters():
        if "audio" in name or "interact_attn" in name:
            continue
        want = full[name].detach() if p.dtype == torch.float32 else full[name].detach().bfloat16()
        assert torch.equal(p.detach(), want), name
    # ... and exactly what diffusers' own from_pretrained(torch_dtype=bfloat16) loads, dtype and value
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "Wan-tiny" / "transformer", torch_dtype=torch.bfloat16)
    ours = dict(bf16.named_parameters())
    for name, p in theirs.named_parameters():
        assert ours[name].dtype == p.dtype and torch.equal(ours[name].detach(), p.detach()), name
    cast = cast_keeping_fp32(copy.deepcopy(model), torch.bfloat16)
    assert torch.equal(cast.scale_shift_table, model.scale_shift_table)  # random values: bf16 would round them
    assert not torch.equal(model.scale_shift_table.bfloat16().float(), model.scale_shift_table)
    with torch.no_grad():
        low = bf16(x["latents"].bfloat16(), x["timestep"], x["text"].bfloat16(), x["audio_talk"].bfloat16(),
                   x["audio_listen"].bfloat16())  # fmt: skip
    assert low.dtype == torch.bfloat16 and (low.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_wan_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers transformer config"):
        load_wan_transformer(tmp_path / "nowhere", AUDIO_DIM)
    folder = tmp_path / "i2v"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**WAN_KW, "image_dim": 1280, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="I2V"):
        load_wan_transformer(folder, AUDIO_DIM)
    # a checkpoint with a weight missing is refused, naming it
    wan = _wan()
    wan.save_pretrained(tmp_path / "broken")
    from safetensors.torch import load_file, save_file

    shard = next((tmp_path / "broken").glob("*.safetensors"))
    state = load_file(str(shard))
    state.pop("blocks.1.ffn.net.2.weight")
    save_file(state, str(shard))
    with pytest.raises(ValueError, match="blocks.1.ffn.net.2.weight"):
        load_wan_transformer(tmp_path / "broken", AUDIO_DIM)


@torch.no_grad()
def test_three_attention_modes_share_weights_and_differ_only_in_what_they_see():
    torch.manual_seed(0)
    model = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM)).eval()
    layout = CausalLayout(chunk_frames=3, sink_frames=4, window_frames=100, rapr=False, max_distance=100)
    x = _inputs(frames=10, batch=1)
    later = {**x, "latents": x["latents"].clone()}
    later["latents"][:, :, 7:] += 1.0  # change only the last chunk (frames 7-9)
    causal, causal_later = model(**x, attention="block_causal", layout=layout), model(**later, attention="block_causal", layout=layout)
    bi, bi_later = model(**x), model(**later)
    # causal between chunks: frames 0-6 cannot see the change; bidirectional frames can
    assert torch.equal(causal[:, :, :7], causal_later[:, :, :7])
    assert (bi[:, :, :7] - bi_later[:, :, :7]).abs().max() > 1e-4
    # bidirectional inside a chunk: frame 7 sees frame 9
    inner = {**x, "latents": x["latents"].clone()}
    inner["latents"][:, :, 9] += 1.0
    assert (model(**inner, attention="block_causal", layout=layout)[:, :, 7] - causal[:, :, 7]).abs().max() > 1e-4
    # the reference chunk sees only itself, so its output equals a one-frame forward
    ref_only = model(**{k: v[:, :, :1] if k == "latents" else v[:, :1] if k in ("timestep", "audio_talk", "audio_listen") else v
                        for k, v in x.items()})  # fmt: skip
    assert (causal[:, :, :1] - ref_only).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="whole chunks"):
        model(**_inputs(frames=9, batch=1), attention="block_causal", layout=layout)
    with pytest.raises(ValueError, match="unknown attention mode"):
        model(**x, attention="sideways", layout=layout)


def _trained_audio(spec: DiTSpec, seed: int = 0) -> AudioDiT:
    torch.manual_seed(seed)
    model = AudioDiT(spec).eval()
    for block in model.blocks:  # trained-looking audio modules (their outputs start at zero)
        torch.nn.init.normal_(block.audio_attn.to_out.weight, std=0.2)
        torch.nn.init.normal_(block.interact_attn.to_out.weight, std=0.2)
    return model


@torch.no_grad()
def test_audio_slots_make_the_token_order_within_a_frame_matter():
    """Without slots the frame-local audio attention is a weighted sum over an unordered set: permuting a
    frame's tokens changes nothing, so the model cannot tell which video frame a sound belongs to. With a slot
    embedding per token position it can; at the zero-output start both equal plain Wan."""
    x = _inputs()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    shuffled = {**x, "audio_talk": x["audio_talk"][:, :, perm], "audio_listen": x["audio_listen"][:, :, perm]}
    plain = _trained_audio(DiTSpec(audio_dim=AUDIO_DIM))
    assert (plain(**shuffled) - plain(**x)).abs().max().item() <= 1e-5
    slots = _trained_audio(DiTSpec(audio_dim=AUDIO_DIM, audio_slots=10))
    assert slots.audio_embedder.slot.shape == (10, 32)
    assert (slots(**shuffled) - slots(**x)).abs().max().item() > 1e-3
    fresh = _ours_from(_wan())
    start = AudioDiT(DiTSpec(audio_dim=AUDIO_DIM, audio_slots=10, audio_null_key=True)).eval()
    start.load_state_dict({**start.state_dict(), **fresh.state_dict()})
    assert (start(**x) - fresh(**x)).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="10 slots"):
        slots(**{**x, "audio_talk": x["audio_talk"][:, :, :6]})


@torch.no_grad()
def test_audio_null_key_lets_each_video_token_take_no_audio():
    """The null key's value is zero: a token whose query prefers it takes (almost) no audio, which a softmax
    over the audio tokens alone cannot do; the output is the softmax over [audio keys, null key]."""
    from model.dit import AudioAttention

    torch.manual_seed(0)
    attn = AudioAttention(32, 2, 1e-6, null_key=True)
    torch.nn.init.normal_(attn.to_out.weight, std=0.2)
    x, audio = torch.randn(2, 3, 16, 32), torch.randn(2, 3, 5, 32)
    h = attn.norm(x)
    q = attn.norm_q(attn.to_q(h)).unflatten(-1, (2, 16))  # [B, F, N, heads, hd]
    k = attn.norm_k(attn.to_k(audio)).unflatten(-1, (2, 16))
    v = attn.to_v(audio).unflatten(-1, (2, 16))
    attn.null_k.copy_(torch.randn(2, 16))
    k_all = torch.cat([k, attn.null_k.expand(2, 3, 1, 2, 16)], dim=2)
    v_all = torch.cat([v, torch.zeros(2, 3, 1, 2, 16)], dim=2)
    w = torch.einsum("bfnhd,bfahd->bfhna", q, k_all).div(16**0.5).softmax(-1)
    want = attn.to_out(torch.einsum("bfhna,bfahd->bfnhd", w, v_all).flatten(-2))
    assert (attn(x, audio) - want).abs().max().item() <= 1e-5
    # a null key far along a token's query takes nearly all of its attention: that token gets ~no audio
    attn.null_k.copy_(q[0, 0, 0] * 50)
    out = attn(x, audio)
    plain = attn.to_out.bias.expand(32)
    assert (out[0, 0, 0] - plain).abs().max() < 1e-3 * (out[0, 0, 1:] - plain).abs().max()


def test_wan_loader_builds_the_audio_slots_and_null_keys(tmp_path):
    wan = _wan(3)
    wan.save_pretrained(tmp_path / "Wan-tiny" / "transformer")
    model = load_wan_transformer(tmp_path / "Wan-tiny", AUDIO_DIM, audio_slots=10, audio_null_key=True)
    assert model.spec.audio_slots == 10 and model.spec.audio_null_key
    assert model.audio_embedder.slot.shape == (10, 32) and model.blocks[1].interact_attn.null_k.shape == (2, 16)
    assert all(p.device.type == "cpu" for p in model.parameters())
    x = _inputs()
    with torch.no_grad():
        expected = wan(x["latents"], _per_token(x["timestep"], 16), x["text"]).sample
        assert (model(**x) - expected).abs().max().item() <= 1e-5


def test_wan_loader_builds_the_long_memory_closed(tmp_path):
    from model.attention import CausalLayout

    wan = _wan(4)
    wan.save_pretrained(tmp_path / "Wan-tiny" / "transformer")
    plain = load_wan_transformer(tmp_path / "Wan-tiny", AUDIO_DIM)
    model = load_wan_transformer(tmp_path / "Wan-tiny", AUDIO_DIM, memory_slots=3)
    assert model.spec.memory_slots == 3 and model.blocks[0].long_memory.queries.shape == (3, 2, 16)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(float(b.long_memory.gate.abs().sum()) == 0 for b in model.blocks)
    x = _inputs()
    layout = CausalLayout(chunk_frames=1, sink_frames=1, window_frames=1, rapr=True, max_distance=4)
    assert layout.evicted(6) == [1, 2, 3, 4]  # 7 frames: the late ones read a memory of evicted frames
    with torch.no_grad():
        assert torch.equal(model(**x, attention="block_causal", layout=layout),
                           plain(**x, attention="block_causal", layout=layout))  # fmt: skip
