"""The Reasoning-Reaction Module: the reasoner, State-Cycling and Cache-Switching in the streaming generator."""

from __future__ import annotations

import pytest
import torch

from model.interaction import ACTIONS, LocalLLMReasoner, RuleReasoner, StateCycler
from tasks.common.models import build_generator
from tasks.config import load_config


def test_rule_reasoner_maps_messages_to_actions():
    r = RuleReasoner()
    cases = {
        "Yes, exactly what I meant.": "nod",
        "No, I don't think so.": "shake",
        "Could you turn to the left for a second?": "turn_left",
        "Look a bit to the right please": "turn_right",
        "Haha, that was a funny one": "smile",
        "The weather report said rain.": "idle",
        "That's right": "nod",
        "Hello there!": "wave",
        "Okay, bye for now": "wave",  # a greeting before agreement
        "They said hi to the archive": "wave",
        "This is highly unusual": "idle",  # "hi" only as a word
    }
    for message, action in cases.items():
        assert r.decide(message).action == action, message
    assert r.decide("What do you think?").speak and not r.decide("Nice weather today.").speak
    assert set(a for a in cases.values()) <= set(ACTIONS)


def test_state_cycling_finishes_each_action_and_returns_to_the_audio_state():
    c = StateCycler()
    assert c.step(False, True) == ("listening", "idle")
    c.request("nod", 2)
    c.request("smile", 3)  # the latest request wins while nothing runs yet
    assert c.step(False, True) == ("reacting", "smile")
    c.request("shake", 1)  # arrives mid-action: waits until the smile has finished
    assert [c.step(True, False) for _ in range(2)] == [("reacting", "smile")] * 2
    assert c.step(True, False) == ("reacting", "shake")
    assert c.step(True, False) == ("speaking", "idle")  # back to what the audio says
    assert c.step(False, False) == ("idle", "idle")
    assert len(c.history) == 7
    with pytest.raises(ValueError, match="dance"):
        c.request("dance", 1)
    with pytest.raises(ValueError, match="at least one chunk"):
        c.request("nod", 0)


def test_local_llm_reasoner_plumbing_with_a_tiny_random_model(tmp_path):
    """A tiny random GPT-2 and a word-level tokenizer saved to a folder: the reasoner loads them from the local
    path, generates, and falls back on the rules when the answer holds no action word (a random model's does
    not); an answer with one is taken."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]", *ACTIONS, "an", "avatar", "reacts", "to", "what", "it", "hears", "with", "one",
             "of", "message", "reaction", "yes", "no", "look", "left", ",", ".", ":", "\n"]  # fmt: skip
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    fast.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "lm")
    reasoner = LocalLLMReasoner(tmp_path / "lm", max_new_tokens=3)
    intent = reasoner.decide("yes")
    assert intent.action in ACTIONS and intent.reason
    # force the model's answer: a logits bias towards "shake" makes it say so, and it is taken over the rules
    with torch.no_grad():
        reasoner.model.lm_head.weight.zero_()
        reasoner.model.lm_head.weight[words.index("shake")] = 0
        reasoner.model.transformer.ln_f.bias.zero_()
        reasoner.model.lm_head.weight[words.index("shake"), 0] = 100.0
        reasoner.model.transformer.ln_f.weight.zero_()
        reasoner.model.transformer.ln_f.bias[0] = 1.0
    assert reasoner.decide("yes").action == "shake"
    with torch.no_grad():  # now it only ever says "an": no action word, so the rules decide ("yes" -> nod)
        reasoner.model.lm_head.weight[words.index("shake"), 0] = 0.0
        reasoner.model.lm_head.weight[words.index("an"), 0] = 100.0
    decided = reasoner.decide("yes")
    assert decided.action == "nod" and "rule nod" in decided.reason
    with pytest.raises(FileNotFoundError, match="local language model"):
        LocalLLMReasoner(tmp_path / "missing")


def _generator(root):
    gen = build_generator(load_config([], ["vae.pretrained_path=null"], root=root))
    gen.action_text = {"nod": torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(5))}
    return gen


def _audio(gen, i):
    g = torch.Generator().manual_seed(i)
    voice = torch.randn(gen.samples_per_chunk, generator=g) * 0.1
    return voice, torch.zeros_like(voice)


@torch.no_grad()
def test_cache_switching_changes_the_conditioning_at_the_next_chunk_only(repo_root):
    ref = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run(switch_at: int | None, recache: bool = False):
        gen = _generator(repo_root)
        gen.start(ref)
        outs = []
        for i in range(5):
            if i == switch_at:
                gen.set_action("nod", recache=recache)
            outs.append(gen.denoise(*_audio(gen, i)))
        return torch.cat(outs, dim=2), gen

    base, _ = run(None)
    switched, gen = run(3)
    assert gen.action == "nod" and gen.context is gen.contexts["nod"]
    c = gen.layout.chunk_frames
    assert torch.equal(base[:, :, : 3 * c], switched[:, :, : 3 * c])  # chunks before the switch: unchanged
    assert (base[:, :, 3 * c :] - switched[:, :, 3 * c :]).abs().max() > 1e-4  # from the next chunk on: the new prompt
    recached, _ = run(3, recache=True)  # the window re-encoded under the new prompt: another result again
    assert (recached[:, :, 3 * c :] - switched[:, :, 3 * c :]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="no prompt for action"):
        gen.set_action("dance")

    # what each does to the visual KV cache at the switch: Cache-Switching nothing, re-caching the window
    for recache in (False, True):
        gen = _generator(repo_root)
        gen.start(ref)
        for i in range(3):
            gen.denoise(*_audio(gen, i))
        before = [(k.clone(), v.clone()) for k, v in zip(gen.cache.win_k, gen.cache.win_v, strict=True)]
        sink = [k.clone() for k in gen.cache.sink_k]
        frames = list(gen.cache.frames)
        gen.set_action("nod", recache=recache)
        gen._switch()  # what the next denoise() does first
        assert gen.cache.frames == frames and all(torch.equal(a, b) for a, b in zip(sink, gen.cache.sink_k, strict=True))
        same = [torch.equal(k0, k1) and torch.equal(v0, v1)
                for (k0, v0), k1, v1 in zip(before, gen.cache.win_k, gen.cache.win_v, strict=True)]  # fmt: skip
        assert all(same) if not recache else not any(same)


def test_action_labels_flow_from_the_annotation_to_the_training_windows(tmp_path):
    """The corpus's merged_anno ``actions`` (seconds) -> the source clip -> a window's label: the action that begins
    near the window's start, else idle; malformed annotations are errors naming the file."""
    import json

    import pandas as pd

    from tasks.curation.sources import record_actions, synthetic_clips
    from tasks.training.data import window_action

    corpus = tmp_path / "raw" / "synthetic"
    (corpus / "merged_anno").mkdir(parents=True)
    ids = ["syabc_256x320_full_video_001_A_00", "syabc_256x320_full_video_001_B_01"]
    pd.DataFrame({"clip_id": ids, "status": ["ok", "ok"], "video_path": ["a.mp4", "b.mp4"], "gt_path": ["", ""],
                  "photo": ["boy.jpg", "girl.jpg"]}).to_parquet(corpus / "corpus.parquet")  # fmt: skip
    (corpus / "merged_anno" / f"{ids[0]}.json").write_text(json.dumps(
        {"actions": [{"name": "nod", "start_s": 1.0, "end_s": 2.2}, {"name": "smile", "start_s": 4.0, "end_s": 4.3}]}))
    (corpus / "merged_anno" / f"{ids[1]}.json").write_text(json.dumps({"bbox": [0, 0, 1, 1]}))  # no actions
    a, b = synthetic_clips(corpus)
    assert json.loads(a.actions) == [["nod", 1.0, 2.2], ["smile", 4.0, 4.3]] and b.actions == ""
    # a 25-frame window (reference + 24 generated frames at 25 fps) starting at frame s: labelled with the action
    # that begins from 0.25 s before its reference frame to 0.5 s after it (the nod begins at frame 25, 1.0 s)
    assert window_action(a.actions, 24, 25, 25) == "nod"  # the nod begins right after the reference
    assert window_action(a.actions, 13, 25, 25) == "nod"  # it begins 0.48 s after the reference
    assert window_action(a.actions, 11, 25, 25) == "idle"  # 0.56 s after: too late in the window
    assert window_action(a.actions, 30, 25, 25) == "nod"  # 0.24 s before the reference: under way
    assert window_action(a.actions, 0, 25, 25) == "idle"  # 1.0 s in: the window shows little of it
    assert window_action(a.actions, 36, 25, 25) == "idle"  # only the rest and end of the nod
    assert window_action(a.actions, 96, 25, 25) == "smile"  # the smile begins at frame 100
    assert window_action(b.actions, 24, 25, 25) == window_action(None, 24, 25, 25) == "idle"
    for bad, why in (({"name": "dance", "start_s": 0, "end_s": 1}, "one of idle"),
                     ({"name": "nod", "start_s": 2, "end_s": 1}, "start_s < end_s"),
                     ({"name": "nod"}, "needs name, start_s and end_s")):  # fmt: skip
        with pytest.raises(ValueError, match=why) as err:
            record_actions({"actions": [bad]}, "x/merged_anno/c.json")
        assert "x/merged_anno/c.json: actions[0]" in str(err.value)


def test_action_share_spreads_the_draws_over_the_actions():
    from tasks.training.engine import action_weights, global_batch

    labels = ["idle"] * 6 + ["nod"] * 2 + ["shake"]
    w = action_weights(labels, 0.5)
    share = {a: float(sum(x for x, b in zip(w, labels, strict=True) if b == a)) for a in set(labels)}
    assert share == pytest.approx({"idle": 0.5, "nod": 0.25, "shake": 0.25})
    draws = global_batch(torch.Generator().manual_seed(0), len(labels), 20000, w)
    assert (draws >= 6).float().mean() == pytest.approx(0.5, abs=0.02)  # the action windows
    assert (draws == 8).float().mean() == pytest.approx(0.25, abs=0.02)  # the one shake window
    assert action_weights(labels, 0.0) is None and action_weights(["idle"] * 3, 0.5) is None
    assert action_weights(["nod", "smile"], 0.3).tolist() == [0.5, 0.5]  # no idle window: the actions share all


def test_each_window_is_conditioned_on_its_actions_prompt(tmp_path):
    from model.text import action_embeddings
    from tasks.training.common import start_run

    cfg = load_config(sets=["tracking.enabled=false"], root=tmp_path)
    run = start_run(cfg, tmp_path, progress=False)
    emb = action_embeddings(cfg.model.prompt, cfg.model.text_len, cfg.model.text_dim)
    texts = run.texts(["idle", "nod", "idle", "smile"])
    assert texts.shape == (4, cfg.model.text_len, cfg.model.text_dim)
    for row, name in zip(texts, ["idle", "nod", "idle", "smile"], strict=True):
        assert torch.equal(row, emb[name][0])
    assert torch.equal(run.texts(["idle", "idle"]), run.text_batch(2))  # unlabelled data: exactly as before
    with pytest.raises(ValueError, match="dance"):
        run.texts(["dance"])


def test_ode_pairs_take_their_share_of_action_windows():
    from tasks.training.ode_pairs import pair_windows

    assert pair_windows(["idle"] * 10, 4, 0.0) == [0, 3, 6, 9] == pair_windows(["idle"] * 10, 4, 0.5)  # no labels
    labels = ["idle"] * 20 + ["nod", "smile", "nod"]
    assert pair_windows(labels, 8, 0.0) == [0, 3, 6, 9, 13, 16, 19, 22]  # spread: one action window by chance
    chosen = pair_windows(labels, 8, 0.5)
    assert len(chosen) == 8 and {20, 21, 22} <= set(chosen)  # all three (fewer than half of 8)
    many = labels * 4
    assert sum(many[i] != "idle" for i in pair_windows(many, 8, 0.5)) == 4  # half of the pairs
