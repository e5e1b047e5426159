"""Every training stage learns: on a tiny fixed data set, with tiny randomly initialised models, each stage's
own update (the functions the stages call) lowers its loss or its measurable objective by a stated factor
within a few dozen steps, and the ODE-initialised student beats the untrained one on held-out ODE pairs.

The data: two fixed smooth latent clips [4, 1 + 6, 4, 4] (frame 0 the reference) with fixed audio tokens.
The teacher is a tiny AudioDiT fitted to them by flow matching (module fixture, ~150 steps), the target
distribution of ODE init and SiD is its ODE output (CFG 3), the GAN's is the two real clips.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.attention import CausalLayout
from model.dit import AudioDiT, DiTSpec
from model.sampling import euler_sample_sigmas, student_sigmas, teacher_sigmas
from tasks.config import DistillConfig, RefineConfig
from tasks.training.common import latent_fd, student_samples, teacher_velocity
from tasks.training.distill import SidDraw, ode_init_loss, sid_update
from tasks.training.refine import RefineDraw, refine_update
from tasks.training.teacher import teacher_loss

B, F, H, Z = 2, 6, 4, 4
LAYOUT = CausalLayout(chunk_frames=2, sink_frames=3, window_frames=2, rapr=True, max_distance=4)
SIGMAS = student_sigmas(3, 5.0)
GUIDANCE = 3.0


def tiny(seed: int) -> AudioDiT:
    torch.manual_seed(seed)
    return AudioDiT(DiTSpec(num_attention_heads=2, attention_head_dim=8, in_channels=Z, out_channels=Z, text_dim=8,
                            ffn_dim=32, num_layers=2, audio_dim=6))  # fmt: skip


def trainable(model: AudioDiT, on: bool = True) -> AudioDiT:
    for p in model.parameters():
        p.requires_grad_(on)
    return model.train(on)


def _clip(k: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, H), indexing="ij")
    frames = [torch.stack([torch.sin(3 * xx + 0.5 * f + k), torch.cos(2 * yy - 0.3 * f * k), xx * yy * (k + 1),
                           0.5 * torch.sin(xx + yy + f)]) for f in range(1 + F)]  # fmt: skip
    return 0.6 * torch.stack(frames, 1)


DATA = torch.stack([_clip(0), _clip(1)])  # [2, Z, 1 + F, H, H]
_g = torch.Generator().manual_seed(0)
TALK, LISTEN = torch.randn(2, 1 + F, 5, 6, generator=_g), torch.randn(2, 1 + F, 5, 6, generator=_g)
TALK[:, 0] = LISTEN[:, 0] = 0  # the reference's slot is silent
TEXT = torch.randn(1, 3, 8, generator=_g)


def text(n: int) -> torch.Tensor:
    return TEXT.expand(n, -1, -1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to the rest of the suite)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher() -> AudioDiT:
    """A tiny teacher fitted to the two clips (random levels and noise, audio dropped 20% of the time)."""
    model = tiny(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        sigma, noise = torch.rand(B, generator=g), torch.randn(DATA.shape, generator=g)
        keep = (torch.rand(B, 1, 1, 1, generator=g) > 0.2).float()
        loss = teacher_loss(model, DATA, sigma, noise, text(B), TALK * keep, LISTEN * keep)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return trainable(model, False).eval()


def make_pairs(teacher: AudioDiT, n: int, seed: int):
    """n ODE pairs as the ode_pairs stage makes them: (clip index, states at the student's levels, x0)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % 2
    x = torch.randn(n, Z, 1 + F, H, H, generator=g)
    x[:, :, :1] = DATA[idx, :, :1]
    sig = teacher_sigmas(12, 5.0, SIGMAS)
    keep_at = [sig.index(s) for s in SIGMAS]
    states = []
    fn = teacher_velocity(teacher, teacher.prepare_text(text(n)), TALK[idx], LISTEN[idx], GUIDANCE)
    out = euler_sample_sigmas(fn, x, sig, keep=lambda i, s, xs: states.append(xs[:, :, 1:].clone()) if i in keep_at else None)
    return idx, torch.stack(states, 1), out[:, :, 1:]


@pytest.fixture(scope="module")
def pairs(teacher):
    return make_pairs(teacher, 8, seed=1), make_pairs(teacher, 4, seed=2)  # train, held out


def samples(student: AudioDiT, idx: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The student's own 3-step streaming samples (frames 1..) from ``noise``."""
    n = len(idx)
    return student_samples(student, text(n), DATA[idx, :, :1], TALK[idx], LISTEN[idx], LAYOUT, SIGMAS, noise, 0,
                           "noisy")[:, :, 1:]  # fmt: skip


# ------------------------------------------------------------------------------------------------ teacher
def test_teacher_flow_matching_overfits_a_fixed_batch():
    model = tiny(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    sigma, noise = torch.tensor([0.3, 0.7]), torch.randn(DATA.shape, generator=g)
    losses = []
    for _ in range(40):
        loss = teacher_loss(model, DATA, sigma, noise, text(B), TALK, LISTEN)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, losses[::10]  # measured: 1.62 -> 0.29


# ----------------------------------------------------------------------------------------------- ODE init
def _levels(g: torch.Generator, n: int):
    chunks = LAYOUT.chunks(1 + F)[1:]
    return chunks, torch.randint(len(SIGMAS), (n, len(chunks)), generator=g)


def ode_batch(pairs_, g: torch.Generator):
    """The ODE-init batch of the stage: every chunk at one of the kept levels, the ODE output as target."""
    idx, states, x0 = pairs_
    n = len(idx)
    chunks, level = _levels(g, n)
    sig = torch.tensor(SIGMAS)
    x = torch.empty(n, Z, 1 + F, H, H)
    x[:, :, 0] = DATA[idx, :, 0]
    frame_sigma = torch.zeros(n, 1 + F)
    for c, (st, en) in enumerate(chunks):
        k = level[:, c]
        x[:, :, st:en] = states[torch.arange(n), k][:, :, st - 1 : en - 1]
        frame_sigma[:, st:en] = sig[k][:, None]
    return x, frame_sigma, torch.cat([DATA[idx, :, :1], x0], 2)


@torch.no_grad()
def held_out_regression(student: AudioDiT, pairs_) -> float:
    """The ODE-init objective on held-out pairs, averaged over the kept levels (every chunk at one level)."""
    idx, states, x0 = pairs_
    n, errs = len(idx), []
    for k, s in enumerate(SIGMAS):
        x = torch.cat([DATA[idx, :, :1], states[:, k]], 2)
        frame_sigma = torch.full((n, 1 + F), s)
        frame_sigma[:, 0] = 0
        errs.append(ode_init_loss(student, x, frame_sigma, text(n), TALK[idx], LISTEN[idx], LAYOUT,
                                  torch.cat([DATA[idx, :, :1], x0], 2)).item())  # fmt: skip
    return sum(errs) / len(errs)


@pytest.fixture(scope="module")
def ode_init_run(teacher, pairs):
    """The stage's start (the student is a copy of the teacher), 40 ODE-init steps on the 8 training pairs."""
    train, _ = pairs
    untrained = copy.deepcopy(teacher)
    student = trainable(copy.deepcopy(teacher))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    idx = train[0]
    losses = []
    for _ in range(40):
        x, frame_sigma, target = ode_batch(train, g)
        loss = ode_init_loss(student, x, frame_sigma, text(len(idx)), TALK[idx], LISTEN[idx], LAYOUT, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return untrained, student.eval(), losses


def test_ode_init_loss_falls_on_its_pairs(ode_init_run):
    _, _, losses = ode_init_run
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 5, losses[::10]  # measured: 0.048 -> 0.003


def test_ode_init_student_beats_the_untrained_one_on_held_out_pairs(ode_init_run, pairs):
    untrained, student, _ = ode_init_run
    _, held = pairs
    # the objective on pairs it never saw: the x0 prediction from the teacher's states
    before, after = held_out_regression(untrained, held), held_out_regression(student, held)
    assert after < before / 3, (before, after)  # measured: 0.049 -> 0.009
    # the product: its own few-step streaming samples against the teacher's ODE output from the SAME noise
    idx, states, x0 = held
    mse_before = ((samples(untrained, idx, states[:, 0]) - x0) ** 2).mean().item()
    mse_after = ((samples(student, idx, states[:, 0]) - x0) ** 2).mean().item()
    assert mse_after < 0.99 * mse_before, (mse_before, mse_after)  # measured: 0.553 -> 0.537


def test_ode_init_batch_takes_teacher_states_or_noised_data_rows():
    """ode_init.gt_share's rows: their data window noised at the chunk's kept level, regressed onto the data; the
    other rows exactly the teacher's states and output (what a batch without the option holds)."""
    from model.sampling import add_noise
    from tasks.training.distill import ode_init_batch

    g = torch.Generator().manual_seed(3)
    sig = torch.tensor(SIGMAS)
    states = torch.randn(B, len(SIGMAS), Z, F, H, H, generator=g)
    x0 = torch.randn(B, Z, F, H, H, generator=g)
    chunks = LAYOUT.chunks(1 + F)[1:]
    level = torch.randint(len(SIGMAS), (B, len(chunks)), generator=g)
    noise = torch.randn(B, Z, 1 + F, H, H, generator=g)
    plain = ode_init_batch(DATA, states, x0, sig, chunks, level)
    x, fs, target = ode_init_batch(DATA, states, x0, sig, chunks, level, torch.tensor([True, False]), noise)
    for c, (st, en) in enumerate(chunks):
        for b in range(B):
            assert torch.equal(plain[0][b, :, st:en], states[b, level[b, c], :, st - 1 : en - 1])
            assert torch.all(fs[b, st:en] == sig[level[b, c]])
    assert torch.equal(plain[2][:, :, 1:], x0) and torch.equal(x[:, :, 0], DATA[:, :, 0]) and torch.all(fs[:, 0] == 0)
    # row 1 is a teacher row, unchanged; row 0 is the data, noised at the same levels
    assert torch.equal(x[1], plain[0][1]) and torch.equal(target[1], plain[2][1]) and torch.equal(fs, plain[1])
    assert torch.equal(target[0], DATA[0])
    assert torch.allclose(x[0], add_noise(DATA[0], noise[0], fs[0].view(1, -1, 1, 1)))
    assert not torch.allclose(x[0, :, 1:], plain[0][0, :, 1:])


# ---------------------------------------------------------------------------------------------------- SiD
def sid_draw(g: torch.Generator) -> SidDraw:
    idx = torch.randint(2, (B,), generator=g)
    return SidDraw(text(B), DATA[idx, :, :1], TALK[idx], LISTEN[idx], torch.randn(B, Z, F, H, H, generator=g),
                   torch.randn(2, B, Z, F, H, H, generator=g), torch.randint(3, (3,), generator=g).tolist(),
                   0.02 + 0.96 * torch.rand(B, generator=g), torch.randn(B, Z, 1 + F, H, H, generator=g),
                   0.02 + 0.96 * torch.rand(B, generator=g), torch.randn(B, Z, 1 + F, H, H, generator=g))  # fmt: skip


def sid_models(teacher: AudioDiT, student: AudioDiT, lr: float = 1e-3):
    fake = trainable(copy.deepcopy(teacher))  # the stage initialises the fake score from the teacher
    student = trainable(student)
    opt_g = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.0, 0.999))
    opt_f = torch.optim.AdamW(fake.parameters(), lr=lr, betas=(0.0, 0.999))
    return student, fake, opt_g, opt_f


def test_sid_pulls_the_student_to_the_teachers_distribution(teacher, pairs):
    """A randomly initialised student, 40 SiD steps: the latent Frechet distance of its samples to the teacher's
    ODE outputs falls by 3x (measured 0.71 -> 0.12)."""
    train, held = pairs
    target = torch.cat([train[2], held[2]])
    student, fake, opt_g, opt_f = sid_models(teacher, tiny(7))
    d = DistillConfig(real_guidance=GUIDANCE, sid_alpha=1.2)
    before = latent_fd(samples(student, held[0], held[1][:, 0]), target)
    g = torch.Generator().manual_seed(11)
    rows = [sid_update(student, teacher, fake, opt_g, opt_f, sid_draw(g), LAYOUT, SIGMAS, d, grad_clip=1.0)
            for _ in range(40)]  # fmt: skip
    after = latent_fd(samples(student, held[0], held[1][:, 0]), target)
    assert after < before / 3, (before, after)
    assert all(r["grad_norm"] > 0 and r["fake_grad_norm"] > 0 for r in rows)


def test_sid_real_guidance_gives_the_first_step_a_gradient(teacher):
    """The stage's start: student and fake score both copies of the teacher. Without guidance the two scores
    are equal and the SiD gradient is exactly zero; the guided real score gives it a signal at once."""
    norms = {}
    for guidance in (1.0, GUIDANCE):
        student, fake, opt_g, opt_f = sid_models(teacher, copy.deepcopy(teacher))
        d = DistillConfig(real_guidance=guidance)
        row = sid_update(student, teacher, fake, opt_g, opt_f, sid_draw(torch.Generator().manual_seed(3)), LAYOUT,
                         SIGMAS, d)  # fmt: skip
        norms[guidance] = (row["grad_norm"], row["score_gap"])
    assert norms[1.0][0] < 1e-6 and norms[1.0][1] == 0.0, norms  # round-off only (measured 6e-9)
    assert norms[GUIDANCE][0] > 1e-3 and norms[GUIDANCE][1] > 0, norms


# ---------------------------------------------------------------------------------------------------- GAN
def test_gan_pulls_the_student_to_the_real_clips(teacher):
    """A randomly initialised student against the consistency-aware discriminator (backbone: the teacher),
    40 steps with the demo's R1/R2 (penalty_sigma 0.1, weights 1000): the latent Frechet distance of its samples
    to the real clips falls by 1.5x (measured 1.48 -> 0.67), and R1 + R2 are a real part of D's loss (without
    them D wins within 30 steps and the student's samples run away: 1.48 -> 7.1)."""
    from model.discriminator import ConsistencyAwareDiscriminator

    r = RefineConfig(penalty_sigma=0.1, r1_weight=1000.0, r2_weight=1000.0, disc_sigma_range=(0.0, 0.3))
    student = trainable(tiny(7))
    disc = ConsistencyAwareDiscriminator(copy.deepcopy(teacher), 2, 4, 1, 16, max_frames=1 + F)
    trainable(disc)
    opt_g = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.0, 0.999))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.0, 0.999))
    eval_idx = torch.arange(4) % 2
    eval_noise = torch.randn(4, Z, F, H, H, generator=torch.Generator().manual_seed(3))
    before = latent_fd(samples(student, eval_idx, eval_noise), DATA[:, :, 1:])
    g = torch.Generator().manual_seed(11)
    rows = []
    for s in range(40):
        idx = torch.randint(2, (B,), generator=g)
        draw = RefineDraw(text(B), DATA[idx], TALK[idx], LISTEN[idx], torch.randn(B, Z, F, H, H, generator=g),
                          torch.randn(2, B, Z, F, H, H, generator=g), torch.randint(3, (3,), generator=g).tolist(),
                          0.3 * torch.rand(B, generator=g), torch.randn(B, Z, 1 + F, H, H, generator=g),
                          torch.randn(B, Z, 1 + F, H, H, generator=g), torch.Generator().manual_seed(100 + s),
                          torch.Generator().manual_seed(200 + s))  # fmt: skip
        rows.append(refine_update(student, disc, opt_g, opt_d, draw, LAYOUT, SIGMAS, r, "noisy", grad_clip=1.0))
    after = latent_fd(samples(student, eval_idx, eval_noise), DATA[:, :, 1:])
    assert after < before / 1.5, (before, after)
    share = sum(x["penalty_share"] for x in rows) / len(rows)
    assert 0.01 < share < 0.5, share


# ------------------------------------------------------------------------------------ micro batches
def _deltas(models: list, before: list[dict]) -> torch.Tensor:
    return torch.cat([(p.detach() - before[i][n]).flatten() for i, m in enumerate(models)
                      for n, p in m.named_parameters()])  # fmt: skip


@pytest.mark.parametrize("stage", ["teacher", "sid", "gan"])
def test_micro_batches_give_the_gradients_of_the_whole_batch(teacher, stage):
    """A step on a batch of 4 taken whole (1 x 4), in 2 micro batches of 2 (2 x 2) or 4 of 1 (4 x 1): the same
    update (plain SGD at lr 1 without clipping, so the update IS the gradient), for the teacher's flow matching
    (the accumulate helper ODE init shares), SiD's generator and fake-score steps, and the GAN's G and D steps."""
    from model.discriminator import ConsistencyAwareDiscriminator
    from tasks.training.engine import accumulate

    n = 4
    g = torch.Generator().manual_seed(5)
    idx = torch.tensor([0, 1, 1, 0])
    sigma, noise = torch.rand(n, generator=g), torch.randn((n, *DATA.shape[1:]), generator=g)
    sid = SidDraw(text(n), DATA[idx, :, :1], TALK[idx], LISTEN[idx], torch.randn(n, Z, F, H, H, generator=g),
                  torch.randn(2, n, Z, F, H, H, generator=g), [0, 2, 1], 0.02 + 0.96 * torch.rand(n, generator=g),
                  torch.randn(n, Z, 1 + F, H, H, generator=g), 0.02 + 0.96 * torch.rand(n, generator=g),
                  torch.randn(n, Z, 1 + F, H, H, generator=g))  # fmt: skip
    gan = [DATA[idx], torch.randn(n, Z, F, H, H, generator=g), torch.randn(2, n, Z, F, H, H, generator=g),
           0.3 * torch.rand(n, generator=g), torch.randn(n, Z, 1 + F, H, H, generator=g),
           torch.randn(n, Z, 1 + F, H, H, generator=g)]  # fmt: skip
    deltas, logs = {}, {}
    for micro in (0, 2, 1):
        if stage == "teacher":
            model = trainable(copy.deepcopy(teacher))
            models, opts = [model], [torch.optim.SGD(model.parameters(), lr=1.0)]
            before = [{k: v.detach().clone() for k, v in model.named_parameters()}]
            opts[0].zero_grad()
            row = accumulate(model, n, micro, lambda sl, m=model: (teacher_loss(m, DATA[idx[sl]], sigma[sl], noise[sl],
                                                                              text(len(idx[sl])), TALK[idx[sl]],
                                                                              LISTEN[idx[sl]]), {}))  # fmt: skip
            opts[0].step()
        elif stage == "sid":
            student, fake = trainable(tiny(7)), trainable(copy.deepcopy(teacher))
            models = [student, fake]
            before = [{k: v.detach().clone() for k, v in m.named_parameters()} for m in models]
            opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
            row = sid_update(student, teacher, fake, *opts, sid, LAYOUT, SIGMAS,
                             DistillConfig(real_guidance=GUIDANCE), micro=micro)  # fmt: skip
        else:
            student = trainable(tiny(7))
            disc = trainable(ConsistencyAwareDiscriminator(copy.deepcopy(teacher), 2, 4, 1, 16, max_frames=1 + F))
            models = [student, disc]
            before = [{k: v.detach().clone() for k, v in m.named_parameters()} for m in models]
            opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in models]
            draw = RefineDraw(text(n), gan[0], TALK[idx], LISTEN[idx], *gan[1:3], [0, 2, 1], *gan[3:],
                              torch.Generator().manual_seed(100), torch.Generator().manual_seed(200))  # fmt: skip
            row = refine_update(student, disc, *opts, draw, LAYOUT, SIGMAS,
                                RefineConfig(penalty_sigma=0.1, r1_weight=1000.0, r2_weight=1000.0), "noisy",
                                micro=micro)  # fmt: skip
        deltas[micro], logs[micro] = _deltas(models, before), row
    whole = deltas[0]
    assert whole.abs().max() > 1e-4  # the step moved the weights
    for micro in (2, 1):
        err = (deltas[micro] - whole).abs().max() / whole.abs().max()
        assert err < 1e-4, (micro, float(err))  # float32 round-off (measured <= 1.5e-5)
        for k, v in logs[0].items():
            # SiD's loss is a small difference of larger terms (~7e-4 here): float32 round-off reaches 1.2e-5 of
            # it on some CPUs (AMD EPYC), hence an absolute floor; a wrong micro-batch mean is off by 2x
            assert logs[micro][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (micro, k)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass while ``fn`` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_activation_checkpointing_keeps_the_gradients_and_drops_the_activations(teacher):
    """checkpoint_blocks (train.activation_checkpointing): the same loss and gradients (recomputed blocks), and
    autograd keeps a fraction of the activations (measured 0.19 of them on the tiny model)."""
    g = torch.Generator().manual_seed(4)
    sigma, noise = torch.rand(2, generator=g), torch.randn(DATA.shape, generator=g)
    grads, saved = {}, {}
    for on in (False, True):
        model = trainable(copy.deepcopy(teacher))
        model.checkpoint_blocks = on
        loss, saved[on] = _saved_bytes(lambda m=model: teacher_loss(m, DATA, sigma, noise, text(2), TALK, LISTEN))
        loss.backward()
        grads[on] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert saved[True] < 0.5 * saved[False], saved
