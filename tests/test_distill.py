"""Unit tests of lmprune.distill: the KD term against an independent float64 reference, the alpha
schedule, and the CE/KD mix with a real (tiny, frozen) teacher."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmprune.config import KDConfig
from lmprune.distill import Distiller, kd_kl

B, T, V = 2, 5, 11


def reference_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over tokens of sum_v p_t (log p_t - log p_s), in float64, from plain ops."""
    vocab = min(student.shape[-1], teacher.shape[-1])
    s = student[..., :vocab].double() / temperature
    t = teacher[..., :vocab].double() / temperature
    log_p_s = s - torch.logsumexp(s, dim=-1, keepdim=True)
    log_p_t = t - torch.logsumexp(t, dim=-1, keepdim=True)
    p_t = torch.exp(log_p_t)
    per_token = (p_t * (log_p_t - log_p_s)).sum(dim=-1)  # [B, T]
    return per_token.mean() * temperature ** 2


def logits(seed: int, vocab: int = V, scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def close(a: torch.Tensor | float, b: torch.Tensor | float, rel: float) -> bool:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) <= rel * abs(b)


# ---- kd_kl -------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_kl_matches_float64_reference(temperature):
    student, teacher = logits(0), logits(1)
    got = kd_kl(student, teacher, temperature)
    want = reference_kd(student, teacher, temperature)
    assert got.dim() == 0
    assert float(want) > 1e-2  # a real divergence, not a near-zero that any answer matches
    assert close(got, want, 1e-6), (float(got), float(want))


def test_kd_kl_temperature_and_token_mean_matter():
    # guards the reference itself: T^2 scaling and the token mean are visible in the numbers
    student, teacher = logits(0), logits(1)
    k1, k2 = float(kd_kl(student, teacher, 1.0)), float(kd_kl(student, teacher, 2.0))
    assert not close(k1, k2, 1e-3)
    per_token_sum = float(reference_kd(student, teacher, 2.0)) * B * T
    assert not close(k2, per_token_sum, 1e-3) and not close(k2, per_token_sum / B, 1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_kl_padded_student_vocab_ignores_extra_columns(temperature):
    teacher = logits(1)
    student = logits(0, vocab=13)
    student[..., 11:] = 40.0  # huge logits in the padding: would dominate if they counted
    got = kd_kl(student, teacher, temperature)
    want = reference_kd(student[..., :11], teacher, temperature)
    assert close(got, want, 1e-6), (float(got), float(want))
    assert close(got, kd_kl(student[..., :11].contiguous(), teacher, temperature), 1e-6)
    full = reference_kd(torch.cat([student[..., :11], student[..., 11:]], -1),
                        torch.cat([teacher, torch.full((B, T, 2), -1e4, dtype=teacher.dtype)], -1),
                        temperature)  # what counting the padding would give
    assert not close(got, full, 1e-3)


def test_kd_kl_padded_teacher_vocab_ignores_extra_columns():
    student = logits(0)
    teacher = logits(1, vocab=13)
    teacher[..., 11:] = 40.0
    got = kd_kl(student, teacher, 2.0)
    assert close(got, reference_kd(student, teacher[..., :11], 2.0), 1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_kl_of_identical_logits_is_zero(temperature):
    x = logits(3)
    assert abs(float(kd_kl(x, x.clone(), temperature))) <= 1e-7
    # shifting all logits of a token by a constant leaves the distribution unchanged
    assert abs(float(kd_kl(x + 5.0, x, temperature))) <= 1e-5


def test_kd_kl_low_precision_inputs_are_computed_in_fp32():
    student, teacher = logits(0, dtype=torch.bfloat16), logits(1, dtype=torch.bfloat16)
    got = kd_kl(student, teacher, 2.0)
    assert got.dtype == torch.float32
    assert close(got, reference_kd(student, teacher, 2.0), 1e-6)  # the reference sees the same bf16 values


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("student_vocab", [11, 13])
def test_kd_kl_gradient_matches_reference(temperature, student_vocab):
    teacher = logits(1)
    student = logits(0, vocab=student_vocab).requires_grad_(True)
    kd_kl(student, teacher, temperature).backward()
    ref_student = student.detach().double().requires_grad_(True)
    reference_kd(ref_student, teacher, temperature).backward()
    want = ref_student.grad
    assert float(want[..., :11].abs().max()) > 1e-3
    torch.testing.assert_close(student.grad.double(), want, rtol=1e-5, atol=1e-8)
    if student_vocab > 11:
        assert torch.count_nonzero(student.grad[..., 11:]) == 0
    # the analytic gradient: T * (p_s - p_t) / n_tokens on the shared columns
    p_s = torch.softmax(student.detach()[..., :11].double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)
    torch.testing.assert_close(want[..., :11], temperature * (p_s - p_t) / (B * T), rtol=1e-9, atol=1e-12)


# ---- alpha schedule ----------------------------------------------------------------------------

def test_alpha_at_linear_from_start_to_total():
    d = Distiller(KDConfig(alpha=0.2, alpha_end=0.8, temperature=2.0, teacher=None), start_step=10,
                  total_steps=30)
    expected = {0: 0.2, 5: 0.2, 10: 0.2, 15: 0.35, 20: 0.5, 25: 0.65, 29: 0.77, 30: 0.8, 31: 0.8, 100: 0.8}
    for step, alpha in expected.items():
        assert d.alpha_at(step) == pytest.approx(alpha, abs=1e-12), step


def test_alpha_at_can_decrease():
    d = Distiller(KDConfig(alpha=1.0, alpha_end=0.0, temperature=1.0), start_step=0, total_steps=4)
    assert [d.alpha_at(s) for s in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0], abs=1e-12)


def test_alpha_at_without_alpha_end_is_constant():
    d = Distiller(KDConfig(alpha=0.3, alpha_end=None, temperature=2.0), start_step=10, total_steps=30)
    assert [d.alpha_at(s) for s in (0, 10, 20, 30, 50)] == [0.3] * 5


# ---- mix_loss with a real teacher --------------------------------------------------------------

def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, tie_word_embeddings=True))


@pytest.fixture
def setup():
    teacher, student = tiny_llama(1), tiny_llama(2)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out = student(input_ids=ids, labels=ids)
    return teacher, student, ids, out.loss, out.logits


def make_distiller(teacher, alpha=0.3, alpha_end=None, temperature=2.0, start_step=10, total_steps=30):
    d = Distiller(KDConfig(alpha=alpha, alpha_end=alpha_end, temperature=temperature, teacher=None),
                  start_step=start_step, total_steps=total_steps)
    if teacher is not None:
        d.snapshot_teacher(teacher, save_dir=None)
    return d


def test_mix_loss_is_the_alpha_mix_of_ce_and_kd(setup):
    teacher, student, ids, ce, student_logits = setup
    d = make_distiller(teacher, alpha=0.2, alpha_end=0.8, temperature=2.0, start_step=10, total_steps=30)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    kd = kd_kl(student_logits, teacher_logits, 2.0)
    assert not close(kd, ce, 1e-3)  # the two terms differ, so the mix is visible
    for step, alpha in ((10, 0.2), (20, 0.5), (30, 0.8)):
        mixed = d.mix_loss(ce, student_logits, ids, step)
        a = d.alpha_at(step)
        assert a == pytest.approx(alpha, abs=1e-12), step
        assert torch.equal(mixed, (1.0 - a) * ce + a * kd), step  # bit-exact with the schedule's alpha
        assert close(mixed, (1 - alpha) * ce.item() + alpha * kd.item(), 1e-6), step
        assert d.last_kd_loss == pytest.approx(kd.item(), rel=1e-12)
        assert d.metrics(step) == {"kd_loss": round(kd.item(), 6), "kd_alpha": pytest.approx(alpha, abs=1e-12)}


def test_mix_loss_exact_with_constant_alpha(setup):
    teacher, student, ids, ce, student_logits = setup
    d = make_distiller(teacher, alpha=0.25, temperature=4.0, start_step=0)
    with torch.no_grad():
        kd = kd_kl(student_logits, teacher(input_ids=ids).logits, 4.0)
    mixed = d.mix_loss(ce, student_logits, ids, step=3)
    assert torch.equal(mixed, (1.0 - 0.25) * ce + 0.25 * kd)


def test_mix_loss_gradients_reach_the_student_not_the_teacher(setup):
    teacher, student, ids, ce, student_logits = setup
    d = make_distiller(teacher, alpha=1.0, start_step=0)
    d.mix_loss(ce, student_logits, ids, step=0).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(not p.requires_grad for p in d.teacher.parameters()) and not d.teacher.training
    assert all(p.grad is None for p in teacher.parameters())  # the snapshot is a copy
    assert float(student.model.embed_tokens.weight.grad.abs().sum()) > 0


def test_mix_loss_is_ce_before_start_step(setup):
    teacher, student, ids, ce, student_logits = setup
    d = make_distiller(teacher, alpha=0.5, start_step=10)
    assert d.mix_loss(ce, student_logits, ids, step=9) is ce
    assert d.last_kd_loss is None and d.metrics(9) == {}
    assert not torch.equal(d.mix_loss(ce, student_logits, ids, step=10), ce)


def test_mix_loss_is_ce_without_teacher(setup):
    _, student, ids, ce, student_logits = setup
    d = make_distiller(None, alpha=0.5, start_step=0)
    for step in (0, 10, 100):
        assert d.mix_loss(ce, student_logits, ids, step) is ce
    assert d.metrics(10) == {}


def test_snapshot_teacher_is_a_frozen_copy_saved_as_hf_dir(setup, tmp_path):
    teacher, _, ids, _, _ = setup
    d = make_distiller(None)
    save_dir = tmp_path / "teacher"
    d.snapshot_teacher(teacher, save_dir=save_dir)
    with torch.no_grad():
        want = teacher(input_ids=ids).logits
        teacher.model.embed_tokens.weight.add_(1.0)  # later changes of the model do not reach the teacher
        assert torch.equal(d.teacher(input_ids=ids).logits, want)
        reloaded = AutoModelForCausalLM.from_pretrained(save_dir)
        assert torch.equal(reloaded(input_ids=ids).logits, want)
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]  # no temp dir left
