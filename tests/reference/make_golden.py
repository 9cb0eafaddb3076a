#!/usr/bin/python3
"""Golden values for posttrain's tests, computed with PyTorch (Debian python3-torch) in float64.

Independent of posttrain: each value comes from PyTorch's own functions (F.cross_entropy,
F.kl_div, torch.distributions.Categorical, autograd) or from the frameworks' published formulas
re-typed here from their documentation (verl kl_penalty / agg_loss, TRL DFT), not from posttrain.
Run from the repository root:  /usr/bin/python3 tests/reference/make_golden.py > tests/reference/golden.hpp
"""
import math

import torch
import torch.nn.functional as F

torch.manual_seed(20261129)
D = torch.float64


def arr(name, t, kind="double"):
    flat = t.detach().reshape(-1).tolist()
    body = ", ".join(repr(float(v)) if kind == "double" else str(int(v)) for v in flat)
    shape = ", ".join(str(s) for s in t.shape)
    typ = "double" if kind == "double" else "std::int64_t"
    return (f"inline const std::vector<std::int64_t> {name}_shape{{{shape}}};\n"
            f"inline const std::vector<{typ}> {name}{{{body}}};\n")


def scalar(name, v):
    return f"inline constexpr double {name} = {float(v)!r};\n"


out = []
B, T, V = 2, 3, 5
logits = (torch.randn(B, T, V, dtype=D) * 2).requires_grad_()
labels = torch.randint(0, V, (B, T))
labels[0, 2] = -100
labels[1, 0] = -100
out.append(arr("sft_logits", logits))
out.append(arr("sft_labels", labels, "int"))
flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
valid = flat_labels != -100


def emit_with_grad(name, loss):
    logits.grad = None
    loss.backward()
    out.append(scalar(name, loss.item()))
    out.append(arr(name + "_grad", logits.grad))


# PyTorch cross_entropy, reduction="mean" (token mean over non-ignored labels)
emit_with_grad("sft_mean", F.cross_entropy(flat_logits, flat_labels, ignore_index=-100))
# reduction="sum"
emit_with_grad("sft_sum", F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum"))
# label smoothing 0.1, PyTorch's own semantics
emit_with_grad("sft_smooth", F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=0.1))
# PaLM z-loss (coefficient 1e-2 so it is visible): mean over valid tokens of CE + z * logsumexp^2
def ce_tokens():
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none")


lse = torch.logsumexp(flat_logits, dim=-1)
emit_with_grad("sft_zloss", ((ce_tokens() + 1e-2 * lse ** 2) * valid).sum() / valid.sum())
# TRL DFT: -(p.detach() * log p) over valid tokens, token mean
logp = -F.cross_entropy(flat_logits, flat_labels.clamp(min=0), reduction="none")
emit_with_grad("sft_dft", (-(logp.exp().detach() * logp) * valid).sum() / valid.sum())
# verl seq-mean-token-mean of the CE: mean over rows of each row's token mean
ce_bt = ce_tokens().reshape(B, T)
m_bt = valid.reshape(B, T).to(D)
emit_with_grad("sft_seq_mean_token_mean", ((ce_bt * m_bt).sum(-1) / m_bt.sum(-1)).mean())

# Metrics: token accuracy and mean entropy over valid tokens
with torch.no_grad():
    acc = ((flat_logits.argmax(-1) == flat_labels) & valid).sum() / valid.sum()
    ent = torch.distributions.Categorical(logits=flat_logits).entropy()
    out.append(scalar("sft_token_accuracy", acc.item()))
    out.append(scalar("sft_mean_entropy", (ent * valid).sum().item() / valid.sum().item()))
    out.append(arr("entropy_per_token", ent))

# KL estimators (verl kl_penalty definitions; Schulman 2020)
N = 7
logprobs = -torch.rand(N, dtype=D) * 3
ref = -torch.rand(N, dtype=D) * 3
logprobs[0], ref[0] = -0.1, -30.0   # large positive log-ratio: exercises verl's clamps
out.append(arr("kl_logprobs", logprobs))
out.append(arr("kl_ref", ref))
r = logprobs - ref
out.append(arr("kl_k1", r))
out.append(arr("kl_abs", r.abs()))
out.append(arr("kl_k2", 0.5 * r ** 2))
out.append(arr("kl_k3", torch.exp(-r) - 1 + r))
kl = torch.clamp(ref - logprobs, min=-20, max=20)   # verl low_var_kl
out.append(arr("kl_k3_verl", torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)))

# Exact KL over the vocabulary: F.kl_div(input=log q, target=log p, log_target=True) = p (log p - log q)
pl = torch.randn(4, 6, dtype=D).requires_grad_()
ql = torch.randn(4, 6, dtype=D)
out.append(arr("exact_logits", pl))
out.append(arr("exact_ref_logits", ql))
kl_exact = F.kl_div(F.log_softmax(ql, -1), F.log_softmax(pl, -1), log_target=True, reduction="none").sum(-1)
out.append(arr("exact_kl", kl_exact))
kl_exact.sum().backward()
out.append(arr("exact_kl_grad", pl.grad))


# ---- Preference losses: TRL's DPOTrainer formulas (dpo_loss, 2026-07) re-typed with torch ops ----
P = 4
pc = (-torch.rand(P, dtype=D) * 20).requires_grad_()
pr = (-torch.rand(P, dtype=D) * 20).requires_grad_()
rc = -torch.rand(P, dtype=D) * 20
rr = -torch.rand(P, dtype=D) * 20
len_c = torch.tensor([5.0, 12.0, 1.0, 30.0], dtype=D)
len_r = torch.tensor([7.0, 3.0, 9.0, 0.0], dtype=D)   # a zero length: TRL clamps at 1
wc = torch.rand(P, dtype=D)
wr = torch.rand(P, dtype=D)
for name, t in [("dpo_chosen", pc), ("dpo_rejected", pr), ("dpo_ref_chosen", rc), ("dpo_ref_rejected", rr),
                ("dpo_len_chosen", len_c), ("dpo_len_rejected", len_r), ("dpo_w_chosen", wc), ("dpo_w_rejected", wr)]:
    out.append(arr(name, t))
ls = F.logsigmoid


def trl_scores(lc, lr, div, alpha=0.5):
    if div == "reverse_kl":
        return lc, lr
    if div == "forward_kl":
        return -torch.exp(-lc), -torch.exp(-lr)
    if div == "js_divergence":
        return ls(lc), ls(lr)
    coef = 1.0 / (alpha - 1.0)
    return (torch.exp(torch.clamp((alpha - 1) * lc, max=80.0)) * coef,
            torch.exp(torch.clamp((alpha - 1) * lr, max=80.0)) * coef)


def trl_pair(kind, beta, eps, tau, lc, lr, sc, sr):
    d = sc - sr
    x = beta * d
    if kind == "sigmoid":
        return -ls(x) * (1 - eps) - ls(-x) * eps
    if kind == "hinge":
        return torch.relu(1 - x)
    if kind == "ipo":
        return (sc / len_c.clamp(min=1) - sr / len_r.clamp(min=1) - 1 / (2 * beta)) ** 2
    if kind == "ipo_sum":
        return (d - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        return (torch.sigmoid(x) * (ls(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (ls(-x) - math.log(eps)))
    if kind == "nca_pair":
        return -ls(beta * sc) - 0.5 * ls(-beta * sc) - 0.5 * ls(-beta * sr)
    if kind == "robust":
        return (-(1 - eps) * ls(x) + eps * ls(-x)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return -ls(beta * sc) - ls(-beta * sr)
    if kind == "sppo_hard":
        return (sc - 0.5 / beta) ** 2 + (sr + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * lc) + torch.sigmoid(beta * lr)
    if kind == "apo_down":
        return torch.sigmoid(beta * lc) + 1 - torch.sigmoid(x)
    if kind == "discopop":
        m = torch.sigmoid(x / tau)
        return -ls(x) * (1 - m) + torch.exp(-x) * m
    if kind == "sigmoid_norm":
        return -ls(beta * (sc / len_c.clamp(min=1) - sr / len_r.clamp(min=1)))
    if kind == "aot":  # sort the policy and reference log-ratios over the batch separately
        ref_diff = rc - rr
        delta = torch.sort(lc - lr + ref_diff, dim=0)[0] - torch.sort(ref_diff, dim=0)[0]
        return -ls(beta * delta) * (1 - eps) - ls(-beta * delta) * eps
    if kind == "aot_unpaired":
        delta = torch.sort(lc, dim=0)[0] - torch.sort(lr, dim=0)[0]
        return -ls(beta * delta) * (1 - eps) - ls(-beta * delta) * eps
    if kind == "sft":  # token-mean NLL of the chosen completions, expanded per pair
        return (-pc.sum() / len_c.sum()).expand(P)
    raise ValueError(kind)


dpo_cases = [  # (case name, loss kinds with weights, beta, eps, divergence, wpo, reference_free)
    ("sigmoid", [("sigmoid", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("cdpo", [("sigmoid", 1.0)], 0.1, 0.1, "reverse_kl", False, False),
    ("hinge", [("hinge", 1.0)], 0.05, 0.0, "reverse_kl", False, False),
    ("ipo", [("ipo", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("ipo_sum", [("ipo_sum", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("exo_pair", [("exo_pair", 1.0)], 0.1, 1e-3, "reverse_kl", False, False),
    ("nca_pair", [("nca_pair", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("robust", [("robust", 1.0)], 0.1, 0.1, "reverse_kl", False, False),
    ("bco_pair", [("bco_pair", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("sppo_hard", [("sppo_hard", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("apo_zero", [("apo_zero", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("apo_down", [("apo_down", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("discopop", [("discopop", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("sigmoid_norm", [("sigmoid_norm", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("rpo", [("sigmoid", 1.0), ("sft", 0.5)], 0.1, 0.0, "reverse_kl", False, False),
    ("mpo", [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
    ("forward_kl", [("sigmoid", 1.0)], 0.1, 0.0, "forward_kl", False, False),
    ("js", [("sigmoid", 1.0)], 0.1, 0.0, "js_divergence", False, False),
    ("alpha", [("sigmoid", 1.0)], 0.1, 0.0, "alpha_divergence", False, False),
    ("wpo", [("sigmoid", 1.0)], 0.1, 0.0, "reverse_kl", True, False),
    ("reference_free", [("sigmoid", 1.0)], 0.1, 0.0, "reverse_kl", False, True),
    ("aot", [("aot", 1.0)], 0.1, 0.1, "reverse_kl", False, False),
    ("aot_unpaired", [("aot_unpaired", 1.0)], 0.1, 0.0, "reverse_kl", False, False),
]
for name, kinds, beta, eps, div, wpo, ref_free in dpo_cases:
    pc.grad, pr.grad = None, None
    lc = pc - (0 if ref_free else rc)
    lr = pr - (0 if ref_free else rr)
    sc, sr = trl_scores(lc, lr, div)
    loss = 0.0
    for kind, weight in kinds:
        per = trl_pair(kind, beta, eps, 0.05, lc, lr, sc, sr)
        if wpo:
            per = per * wc * wr
        loss = loss + per.mean() * weight
    loss.backward()
    out.append(scalar(f"dpo_{name}_loss", loss.item()))
    out.append(arr(f"dpo_{name}_grad_chosen", pc.grad))
    out.append(arr(f"dpo_{name}_grad_rejected", pr.grad))

# ---- Bradley-Terry reward model: TRL RewardTrainer (margin column, center_rewards_coefficient) ----
r_c = (torch.randn(6, dtype=D) * 2).requires_grad_()
r_r = (torch.randn(6, dtype=D) * 2).requires_grad_()
margin = torch.rand(6, dtype=D)
out.append(arr("rm_chosen", r_c))
out.append(arr("rm_rejected", r_r))
out.append(arr("rm_margin", margin))
rm_loss = -F.logsigmoid(r_c - r_r - margin).mean() + 0.01 * torch.mean((r_c + r_r) ** 2)
rm_loss.backward()
out.append(scalar("rm_loss", rm_loss.item()))
out.append(arr("rm_grad_chosen", r_c.grad))
out.append(arr("rm_grad_rejected", r_r.grad))


# ---- CPO / SimPO / AlphaPO (TRL CPOTrainer.cpo_loss): sums for sigmoid/hinge, averages for ipo/simpo ----
cc = (-torch.rand(P, dtype=D) * 20 - 0.5).requires_grad_()
cr = (-torch.rand(P, dtype=D) * 20 - 0.5).requires_grad_()
out.append(arr("cpo_chosen", cc))
out.append(arr("cpo_rejected", cr))


def cpo_reference(kind, beta, eps, gamma, cpo_alpha, alpha):
    averaged = kind in ("ipo", "simpo")
    uc = cc / len_c.clamp(min=1) if averaged else cc
    ur = cr / len_r.clamp(min=1) if averaged else cr
    if alpha != 0:
        uc = (1 - torch.exp(-alpha * uc)) / alpha   # AlphaPO reward
        ur = (1 - torch.exp(-alpha * ur)) / alpha
    logits = uc - ur
    if kind == "simpo":
        logits = logits - gamma / beta
    if kind in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif kind == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    nll = -cc.sum() / len_c.sum()   # cross_entropy over every chosen completion token
    return losses.mean() + cpo_alpha * nll


for name, args in [("sigmoid", ("sigmoid", 0.1, 0.0, 0.5, 1.0, 0.0)), ("cdpo", ("sigmoid", 0.1, 0.2, 0.5, 1.0, 0.0)),
                   ("hinge", ("hinge", 0.1, 0.0, 0.5, 1.0, 0.0)), ("ipo", ("ipo", 0.1, 0.0, 0.5, 1.0, 0.0)),
                   ("simpo", ("simpo", 2.0, 0.0, 0.5, 0.0, 0.0)), ("alphapo", ("simpo", 2.0, 0.0, 0.5, 0.0, 0.25))]:
    cc.grad, cr.grad = None, None
    loss = cpo_reference(*args)
    loss.backward()
    out.append(scalar(f"cpo_{name}_loss", loss.item()))
    out.append(arr(f"cpo_{name}_grad_chosen", cc.grad))
    out.append(arr(f"cpo_{name}_grad_rejected", cr.grad))

# ---- ORPO (TRL ORPOTrainer.odds_ratio_loss, average log-probs; log1mexp as torch.log1p(-exp)) ----
cc.grad, cr.grad = None, None
ac, ar = cc / len_c.clamp(min=1), cr / len_r.clamp(min=1)
log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
orpo_loss = -cc.sum() / len_c.sum() - 0.1 * F.logsigmoid(log_odds).mean()
orpo_loss.backward()
out.append(scalar("orpo_loss", orpo_loss.item()))
out.append(scalar("orpo_log_odds_chosen", log_odds.mean().item()))
out.append(arr("orpo_grad_chosen", cc.grad))
out.append(arr("orpo_grad_rejected", cr.grad))

# ---- KTO (TRL KTOTrainer.kto_loss) and unpaired BCO (TRL BCOTrainer.bco_loss) ----
Nk = 6
klp = (-torch.rand(Nk, dtype=D) * 10).requires_grad_()
kref = -torch.rand(Nk, dtype=D) * 10
kdes = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=D)
kl_pol = -torch.rand(5, dtype=D) * 10
kl_ref = kl_pol - torch.rand(5, dtype=D)   # policy above the reference: a positive KL baseline
for name, t in [("kto_logps", klp), ("kto_ref", kref), ("kto_desirable", kdes), ("kto_kl_logps", kl_pol),
                ("kto_ref_kl_logps", kl_ref)]:
    out.append(arr(name, t))
lratio = klp - kref
z = (kl_pol - kl_ref).mean().clamp(min=0).detach()
out.append(scalar("kto_kl", z.item()))
chosen, rejected = lratio[kdes == 1], lratio[kdes == 0]
for name, lam_d, lam_u, kind in [("kto", 1.0, 1.0, "kto"), ("kto_weighted", 1.0, 1.33, "kto"),
                                 ("apo_zero_unpaired", 1.0, 1.0, "apo")]:
    klp.grad = None
    chosen, rejected = lratio[kdes == 1], lratio[kdes == 0]
    if kind == "kto":
        cl = 1 - torch.sigmoid(0.1 * (chosen - z))
        rl = 1 - torch.sigmoid(0.1 * (z - rejected))
    else:
        cl = 1 - torch.sigmoid(0.1 * chosen)
        rl = torch.sigmoid(0.1 * rejected)
    loss = torch.cat((lam_d * cl, lam_u * rl), 0).nanmean()
    loss.backward(retain_graph=True)
    out.append(scalar(f"{name}_loss", loss.item()))
    out.append(arr(f"{name}_grad", klp.grad))
# BCO: delta = running mean after one update with this batch's mean reward (RunningMoments from count 1e-24)
klp.grad = None
rew = 0.1 * lratio
delta = rew.mean().detach()
bco_loss = torch.cat((-F.logsigmoid(rew[kdes == 1] - delta), -F.logsigmoid(-(rew[kdes == 0] - delta))), 0).mean()
bco_loss.backward()
out.append(scalar("bco_delta", delta.item()))
out.append(scalar("bco_loss", bco_loss.item()))
out.append(arr("bco_grad", klp.grad))

# ---- sequence log-probs from logits (TRL: selective_log_softmax then sum / mean over the completion) ----
logits.grad = None
tok = torch.gather(F.log_softmax(logits, -1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
seq_sum = tok.sum(-1)
seq_mean = seq_sum / (labels != -100).sum(-1).clamp(min=1)
out.append(arr("seq_logps_sum", seq_sum))
out.append(arr("seq_logps_mean", seq_mean))
(seq_sum * torch.tensor([1.0, -2.0], dtype=D)).sum().backward(retain_graph=True)
out.append(arr("seq_logps_sum_grad", logits.grad))   # upstream gradient [1, -2]
logits.grad = None
(seq_mean * torch.tensor([1.0, -2.0], dtype=D)).sum().backward()
out.append(arr("seq_logps_mean_grad", logits.grad))


# ---- LD-DPO (TRL ld_alpha): shared prefix of the completion counts fully, the tail by alpha ----
logits.grad = None
mask = (labels != -100)
comp_pos = torch.cumsum(mask.to(D), dim=1)
shared_len = torch.tensor([1.0, 5.0], dtype=D)   # row 0: only the first completion token is shared
shared_mask = (comp_pos > 0) & (comp_pos <= shared_len.unsqueeze(1))
tail_mask = comp_pos > shared_len.unsqueeze(1)
tok_lp = torch.gather(F.log_softmax(logits, -1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
ld = (tok_lp * shared_mask).sum(1) + 0.3 * (tok_lp * tail_mask).sum(1)
out.append(arr("ld_shared_lengths", shared_len))
out.append(arr("ld_logps", ld))
ld.sum().backward()
out.append(arr("ld_logps_grad", logits.grad))

# ---- Plackett-Luce over K ranked responses (best first): sum_k logsumexp(r_k..) - r_k ----
pl_r = (torch.randn(3, 4, dtype=D) * 3).requires_grad_()
pl = sum(torch.logsumexp(pl_r[:, k:], dim=1) - pl_r[:, k] for k in range(3)).mean()
pl.backward()
out.append(arr("pl_rewards", pl_r))
out.append(scalar("pl_loss", pl.item()))
out.append(arr("pl_grad", pl_r.grad))

print("// Generated by tests/reference/make_golden.py with PyTorch", torch.__version__, "in float64. Do not edit.")
print("// clang-format off\n#pragma once\n#include <cstdint>\n#include <vector>\nnamespace posttrain::golden {")
print("".join(out), end="")
print("}  // namespace posttrain::golden")
