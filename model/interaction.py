"""InteractiveAvatar's Reasoning-Reaction Module, our design: a reasoner maps what the user says to an action
and whether the avatar should answer; State-Cycling runs each action from start to finish and back to the
state the audio calls for; the streaming generator switches the action's precomputed cross-attention
conditioning at the next chunk boundary (Cache-Switching, model/streaming.py).

The action vocabulary is the demo corpus's (tasks/corpus/animate.py renders and labels it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ACTIONS = ("idle", "nod", "shake", "turn_left", "turn_right", "smile", "wave")  # per-frame label = index here
# what each action adds to the prompt (the text path the paper profile conditions through umT5)
ACTION_PROMPTS = {
    "idle": "",
    "nod": "the person nods",
    "shake": "the person shakes their head",
    "turn_left": "the person turns their head to the left",
    "turn_right": "the person turns their head to the right",
    "smile": "the person smiles",
    "wave": "the person waves their hand",
}
STATES = ("idle", "listening", "reacting", "speaking")


def action_prompt(base: str, action: str) -> str:
    """The prompt of ``action``: the base prompt, extended by the action's words (idle: the base itself)."""
    if action not in ACTION_PROMPTS:
        raise ValueError(f"unknown action {action!r}; the vocabulary is {', '.join(ACTIONS)}")
    words = ACTION_PROMPTS[action]
    return f"{base}, {words}" if words else base


@dataclass(frozen=True)
class Intent:
    action: str  # one of ACTIONS
    speak: bool  # the message asks for an answer
    reason: str  # which rule (or model) decided


_RULES: tuple[tuple[str, str], ...] = (
    (r"\b(look|turn|face|glance)\b[^.?!]*\bleft\b|\bto (the|your) left\b", "turn_left"),
    (r"\b(look|turn|face|glance)\b[^.?!]*\bright\b|\bto (the|your) right\b", "turn_right"),
    (r"\b(hi|hello|hey|bye|goodbye|good bye|see you|wave)\b", "wave"),
    (r"\b(no|nope|not really|disagree|never|wrong)\b", "shake"),
    (r"\b(ha(ha)+|lol|funny|joke|thanks?|thank you|great|love|happy|glad|wonderful|smile)\b", "smile"),
    (r"\b(yes|yeah|yep|agree|right|exactly|sure|okay|ok|indeed|nod)\b", "nod"),
)


class RuleReasoner:
    """Keyword rules, first match wins (directions before agreement: "turn right" is not a "right")."""

    def decide(self, message: str) -> Intent:
        text = message.lower().strip()
        speak = text.endswith("?") or bool(re.search(r"\b(you|your)\b", text))
        for pattern, action in _RULES:
            if re.search(pattern, text):
                return Intent(action, speak, f"rule {action}")
        return Intent("idle", speak, "no rule")


class LocalLLMReasoner:
    """A causal language model from a local path (transformers) picks the action word; when its answer holds
    none of the vocabulary the rules decide. Whether to answer comes from the rules either way."""

    def __init__(self, path: str | Path, max_new_tokens: int = 6, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no local language model at {path} (the reasoner's model path)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        self.max_new_tokens = max_new_tokens
        self.rules = RuleReasoner()

    def prompt(self, message: str) -> str:
        return (f"An avatar reacts to what it hears with one of: {', '.join(ACTIONS)}.\n"
                f"Message: {message.strip()}\nReaction:")  # fmt: skip

    def decide(self, message: str) -> Intent:
        import torch

        ids = self.tokenizer(self.prompt(message), return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)  # fmt: skip
        answer = self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).lower()
        ruled = self.rules.decide(message)
        for word in re.findall(r"[a-z_]+", answer):
            if word in ACTIONS:
                return Intent(word, ruled.speak, f"model: {answer.strip()!r}")
        return Intent(ruled.action, ruled.speak, f"model said {answer.strip()!r}: {ruled.reason}")


@dataclass
class StateCycler:
    """Per chunk: the avatar's state and the action it performs. An action requested now starts at the next
    chunk, runs ``chunks`` chunks and ends; meanwhile a newer request waits (the latest one) and starts right
    after, so every action finishes cleanly. Without an action the state follows the audio: speaking when the
    avatar talks, listening when only the partner does, else idle."""

    pending: tuple[str, int] | None = None
    current: str = "idle"
    left: int = 0  # chunks the current action still runs
    history: list[tuple[str, str]] = field(default_factory=list)  # (state, action) per chunk

    def request(self, action: str, chunks: int) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; the vocabulary is {', '.join(ACTIONS)}")
        if chunks < 1:
            raise ValueError(f"an action lasts at least one chunk, got {chunks}")
        self.pending = None if action == "idle" else (action, chunks)

    def step(self, avatar_speaking: bool, partner_speaking: bool) -> tuple[str, str]:
        """The state and action of the next chunk."""
        if self.left == 0 and self.pending is not None:
            (self.current, self.left), self.pending = self.pending, None
        if self.left > 0:
            self.left -= 1
            out = ("reacting", self.current)
        else:
            self.current = "idle"
            state = "speaking" if avatar_speaking else "listening" if partner_speaking else "idle"
            out = (state, "idle")
        self.history.append(out)
        return out
