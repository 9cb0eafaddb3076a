#!/usr/bin/env python3
"""Writes the posttrain-verify fixtures: tests/fixtures/verify/*.safetensors and tools/verify_tests.cmake.

Plain python3 (struct, json, math, random): no torch, no posttrain. Each loss is computed in float64 from the
framework's own published code, transcribed line by line below (file and function cited above each one):
  sft   transformers/loss/loss_utils.py  ForCausalLMLoss  (labels padded with -100 and shifted left, then
        torch.nn.functional.cross_entropy(..., ignore_index=-100, reduction="sum" / num_items_in_batch, or "mean"))
  dpo   trl/trainer/dpo_trainer.py  DPOTrainer.dpo_loss  (sigmoid, hinge, ipo; chosen_rewards/rejected_rewards)
  grpo  trl/trainer/grpo_trainer.py  GRPOTrainer._compute_loss  (per_token_kl k3, coef_1/coef_2 clipping with
        epsilon_low/epsilon_high, loss_type grpo / bnpo / dr_grpo / dapo aggregation)
  kl    verl/trainer/ppo/core_algos.py  kl_penalty / kl_penalty_forward  (kl/k1, abs, mse/k2, low_var_kl/k3, "+")
Gradients are the analytic derivatives of those expressions (what torch autograd returns through them).
The float32 variants round the inputs to float32 first, compute in float64 from the rounded inputs and round
the outputs to float32: a float32 trainer's result to within its own rounding.
Deliberately wrong dumps (one element off, a wrong beta, a sign flip) and malformed files (truncated, bad
JSON, unknown dtype, offsets past the end, overlap, gap, missing or inconsistent tensors) are written too, and
verify_tests.cmake lists the expected exit status and output of posttrain-verify on each (the index a wrong
dump must be reported at is computed here, from the same rule the tool states).

Run from the repository root:  python3 tests/reference/make_verify_fixtures.py
"""
import json
import math
import os
import random
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "verify")
CORPUS = os.path.join(ROOT, "fuzz", "corpus", "safetensors")
TESTS = os.path.join(ROOT, "tools", "verify_tests.cmake")

F64_TOL = (1e-10, 1e-10)  # tools/posttrain_verify.cpp tolerance_for (tests/support/tolerances.hpp)


# ---- safetensors -------------------------------------------------------------------------------

def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def flat(x):
    if isinstance(x, list):
        return [v for item in x for v in flat(item)]
    return [x]


def shape_of(x):
    s = []
    while isinstance(x, list):
        s.append(len(x))
        x = x[0] if x else None
    return s


PACK = {"F64": "d", "F32": "f", "I64": "q", "I32": "i"}


def tensor(dtype, value, shape=None):
    shape = shape_of(value) if shape is None else shape
    values = flat(value)
    assert len(values) == numel(shape)
    return (dtype, shape, struct.pack("<%d%s" % (len(values), PACK[dtype]), *values))


def safetensors_bytes(tensors, metadata=None):
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def raw_file(header_text, data):
    text = header_text.encode()
    return struct.pack("<Q", len(text)) + text + data


def save(name, blob, corpus=False):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(blob)
    if corpus:
        os.makedirs(CORPUS, exist_ok=True)
        with open(os.path.join(CORPUS, name.replace(".safetensors", "")), "wb") as f:
            f.write(blob)


def dump(name, dtype, inputs, outputs, int_inputs=(), corpus=False):
    """inputs/outputs: name -> nested lists of floats; int_inputs: names stored as I64."""
    t = {}
    for k, v in inputs.items():
        t[k] = tensor("I64" if k in int_inputs else dtype, v)
    for k, v in outputs.items():
        t[k] = tensor(dtype, v)
    save(name, safetensors_bytes(t, {"format": "pt", "writer": "tests/reference/make_verify_fixtures.py"}), corpus)


def round_all(x):
    if isinstance(x, dict):
        return {k: round_all(v) for k, v in x.items()}
    return [round_all(v) for v in x] if isinstance(x, list) else f32(x)


# ---- math helpers ----------------------------------------------------------------------------

def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


# ---- SFT: transformers ForCausalLMLoss -----------------------------------------------------------

def sft(logits, labels, ignore_index=-100, num_items_in_batch=None):
    B, T, V = len(logits), len(logits[0]), len(logits[0][0])
    # labels = nn.functional.pad(labels, (0, 1), value=ignore_index); shift_labels = labels[..., 1:]
    shifted = [[labels[b][t + 1] if t + 1 < T else ignore_index for t in range(T)] for b in range(B)]
    count = sum(1 for b in range(B) for t in range(T) if shifted[b][t] != ignore_index)
    denom = num_items_in_batch if num_items_in_batch is not None else count  # reduction "sum"/n or "mean"
    per_token = [[0.0] * T for _ in range(B)]
    grad = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    for b in range(B):
        for t in range(T):
            y = shifted[b][t]
            if y == ignore_index:
                continue
            lp = log_softmax(logits[b][t])
            per_token[b][t] = -lp[y]
            for v in range(V):  # d(-log p_y)/d logit_v = p_v - [v == y]
                grad[b][t][v] = (math.exp(lp[v]) - (1.0 if v == y else 0.0)) / denom
    loss = sum(map(sum, per_token)) / denom
    return {"loss": loss, "per_token_loss": per_token, "logits.grad": grad}


# ---- DPO: TRL DPOTrainer.dpo_loss ---------------------------------------------------------------

def dpo(chosen, rejected, ref_chosen, ref_rejected, loss_type="sigmoid", beta=0.1, label_smoothing=0.0):
    B = len(chosen)
    losses, dh = [], []
    for i in range(B):
        # logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
        h = (chosen[i] - rejected[i]) - (ref_chosen[i] - ref_rejected[i])
        if loss_type == "sigmoid":
            # -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
            losses.append(-log_sigmoid(beta * h) * (1 - label_smoothing) - log_sigmoid(-beta * h) * label_smoothing)
            dh.append(-(1 - label_smoothing) * beta * sigmoid(-beta * h) + label_smoothing * beta * sigmoid(beta * h))
        elif loss_type == "hinge":
            # torch.relu(1 - beta * logits)
            losses.append(max(0.0, 1 - beta * h))
            dh.append(-beta if 1 - beta * h > 0 else 0.0)
        elif loss_type == "ipo":
            # (logits - 1 / (2 * beta)) ** 2  (TRL averages the logps over the completion before dpo_loss for ipo)
            losses.append((h - 1 / (2 * beta)) ** 2)
            dh.append(2 * (h - 1 / (2 * beta)))
        else:
            raise ValueError(loss_type)
    return {
        "losses": losses,
        # chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        "chosen_rewards": [beta * (chosen[i] - ref_chosen[i]) for i in range(B)],
        "rejected_rewards": [beta * (rejected[i] - ref_rejected[i]) for i in range(B)],
        "loss": sum(losses) / B,
        "chosen_logps.grad": [d / B for d in dh],
        "rejected_logps.grad": [-d / B for d in dh],
    }


# ---- GRPO: TRL GRPOTrainer._compute_loss --------------------------------------------------------

def grpo(logps, old, ref, adv, mask, loss_type="dapo", epsilon=0.2, epsilon_high=None, beta=0.0,
         max_completion_length=None, num_items_in_batch=None):
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    B, T = len(logps), len(logps[0])
    per_token, dlp, kl = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            lp = logps[b][t]
            o = old[b][t] if old is not None else lp
            A = adv[b]
            coef_1 = math.exp(lp - o)  # exp(per_token_logps - old_per_token_logps)
            coef_2 = min(max(coef_1, 1 - eps_low), 1 + eps_high)  # torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
            l1, l2 = coef_1 * A, coef_2 * A
            loss = -min(l1, l2)  # -torch.min(per_token_loss1, per_token_loss2)
            assert abs(l1 - l2) > 1e-9 or 1 - eps_low < coef_1 < 1 + eps_high, "a ratio on a clip boundary"
            # d/dlp: -A coef_1 where the unclipped term is the min or coef_2 is not clamped; else 0
            g = -A * coef_1 if (l1 <= l2 or 1 - eps_low < coef_1 < 1 + eps_high) else 0.0
            if beta != 0.0:
                r = ref[b][t]
                # per_token_kl = exp(ref - logp) - (ref - logp) - 1
                k = math.exp(r - lp) - (r - lp) - 1
                kl[b][t] = k
                loss += beta * k
                g += beta * (1 - math.exp(r - lp))
            per_token[b][t] = loss
            dlp[b][t] = g
    ntok = sum(map(sum, mask))
    if loss_type == "grpo":
        # ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        w = [[mask[b][t] / max(sum(mask[b]), 1.0) / B for t in range(T)] for b in range(B)]
    elif loss_type == "bnpo":
        w = [[mask[b][t] / max(ntok, 1.0) for t in range(T)] for b in range(B)]
    elif loss_type == "dr_grpo":
        L = max_completion_length if max_completion_length is not None else T
        w = [[mask[b][t] / (B * L) for t in range(T)] for b in range(B)]
    elif loss_type == "dapo":
        n = num_items_in_batch if num_items_in_batch is not None else ntok
        w = [[mask[b][t] / n for t in range(T)] for b in range(B)]
    loss = sum(per_token[b][t] * w[b][t] for b in range(B) for t in range(T))
    return {
        "loss": loss,
        "per_token_loss": [[per_token[b][t] * mask[b][t] for t in range(T)] for b in range(B)],
        # TRL metric: kl = masked_batch_mean(per_token_kl)
        "kl": sum(kl[b][t] * mask[b][t] for b in range(B) for t in range(T)) / ntok,
        "log_probs.grad": [[dlp[b][t] * w[b][t] for t in range(T)] for b in range(B)],
    }


# ---- KL: verl core_algos.kl_penalty -------------------------------------------------------------

def kl_penalty(logp, ref, name, mask):
    plus = name.endswith("+")
    base = name[:-1] if plus else name
    B, T = len(logp), len(logp[0])
    kl, slope = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            r = logp[b][t] - ref[b][t]
            if base in ("kl", "k1"):
                v, s = r, 1.0
            elif base == "abs":
                v, s = abs(r), (r > 0) - (r < 0)
            elif base in ("mse", "k2"):
                v, s = 0.5 * r * r, r
            elif base in ("low_var_kl", "k3"):
                k = min(max(ref[b][t] - logp[b][t], -20.0), 20.0)  # kl = torch.clamp(ref - logprob, -20, 20)
                v = math.exp(k) - k - 1  # kld = ratio - kl - 1
                s = (1 - math.exp(k)) if -20 < ref[b][t] - logp[b][t] < 20 else 0.0
                if not -10 <= v <= 10:  # torch.clamp(kld, min=-10, max=10)
                    v, s = min(max(v, -10.0), 10.0), 0.0
            if plus:  # backward_score - backward_score.detach() + forward_score.detach(), backward = k2
                s = r
            kl[b][t], slope[b][t] = v, s
    n = sum(map(sum, mask))
    return {
        "kl": kl,
        "loss": sum(kl[b][t] * mask[b][t] for b in range(B) for t in range(T)) / n,  # agg_loss token-mean
        "log_probs.grad": [[slope[b][t] * mask[b][t] / n for t in range(T)] for b in range(B)],
    }


# ---- PPO: verl core_algos.compute_policy_loss ("vanilla") + agg_loss ------------------------------

def verl_masked_mean(values, mask):
    # verl/utils/torch_functional.py masked_mean: masked_sum / (mask.sum() + 1e-8)
    return sum(v * m for rv, rm in zip(values, mask) for v, m in zip(rv, rm)) / (sum(map(sum, mask)) + 1e-8)


def ppo_verl(logp, old, adv, mask, clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
             loss_agg_mode="token-mean"):
    lo = clip_ratio if clip_ratio_low is None else clip_ratio_low
    hi = clip_ratio if clip_ratio_high is None else clip_ratio_high
    B, T = len(logp), len(logp[0])
    pg, dpg, gt, lower, negkl = ([[0.0] * T for _ in range(B)] for _ in range(5))
    for b in range(B):
        for t in range(T):
            A = adv[b][t]
            raw = logp[b][t] - old[b][t]
            nk = min(max(raw, -20.0), 20.0)  # negative_approx_kl = clamp(log_prob - old_log_prob, -20, 20)
            ratio = math.exp(nk)
            l1 = -A * ratio  # pg_losses1
            l2 = -A * min(max(ratio, 1 - lo), 1 + hi)  # pg_losses2
            c1 = max(l1, l2)  # clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
            assert abs(l1 - l2) > 1e-9 or 1 - lo < ratio < 1 + hi, "a ratio on a clip boundary"
            d1 = -A * ratio if (l1 >= l2 or 1 - lo < ratio < 1 + hi) else 0.0  # d c1 / d log_prob
            l3 = -A * clip_ratio_c  # pg_losses3
            if A < 0:  # pg_losses = where(A < 0, clip_pg_losses2 = min(pg_losses3, clip_pg_losses1), clip_pg_losses1)
                assert abs(l3 - c1) > 1e-9
                loss, d = (l3, 0.0) if l3 < c1 else (c1, d1)
            else:
                loss, d = c1, d1
            if not -20 < raw < 20:
                d = 0.0
            pg[b][t], dpg[b][t] = loss, d
            gt[b][t] = 1.0 if l2 > l1 else 0.0
            lower[b][t] = 1.0 if (c1 > l3 and A < 0) else 0.0
            negkl[b][t] = -nk
    n = sum(map(sum, mask))
    if loss_agg_mode == "token-mean":
        w = [[mask[b][t] / (n + 1e-8) for t in range(T)] for b in range(B)]
    elif loss_agg_mode == "seq-mean-token-sum":  # torch.mean(torch.sum(loss_mat * loss_mask, dim=-1))
        w = [[mask[b][t] / B for t in range(T)] for b in range(B)]
    elif loss_agg_mode == "seq-mean-token-mean":  # mean(sum(loss * mask, -1) / (sum(mask, -1) + 1e-8))
        w = [[mask[b][t] / (sum(mask[b]) + 1e-8) / B for t in range(T)] for b in range(B)]
    elif loss_agg_mode == "seq-mean-token-sum-norm":  # sum(sum(loss * mask, -1)) / loss_mask.shape[-1]
        w = [[mask[b][t] / T for t in range(T)] for b in range(B)]
    return {
        "pg_loss": sum(pg[b][t] * w[b][t] for b in range(B) for t in range(T)),
        "pg_losses": [[pg[b][t] * mask[b][t] for t in range(T)] for b in range(B)],
        "pg_clipfrac": verl_masked_mean(gt, mask),
        "ppo_kl": verl_masked_mean(negkl, mask),
        "pg_clipfrac_lower": verl_masked_mean(lower, mask),
        "log_prob.grad": [[dpg[b][t] * w[b][t] for t in range(T)] for b in range(B)],
    }


# ---- reward model: TRL RewardTrainer.compute_loss -------------------------------------------------

def reward_model(rc, rr, margin=None, center_rewards_coefficient=0.0):
    B = len(rc)
    z = [rc[i] - rr[i] - (margin[i] if margin else 0.0) for i in range(B)]
    # loss = -nn.functional.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    loss = sum(-log_sigmoid(v) for v in z) / B
    # loss += center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    loss += center_rewards_coefficient * sum((rc[i] + rr[i]) ** 2 for i in range(B)) / B
    gz = [-sigmoid(-v) / B for v in z]
    center = [2 * center_rewards_coefficient * (rc[i] + rr[i]) / B for i in range(B)]
    return {"loss": loss, "rewards_chosen.grad": [gz[i] + center[i] for i in range(B)],
            "rewards_rejected.grad": [-gz[i] + center[i] for i in range(B)]}


# ---- GAE: TRL PPOTrainer.train / verl compute_gae_advantage_return --------------------------------

def whiten(values, mask, eps_in_mean):
    # TRL trl/trainer/utils.py masked_whiten (masked_mean = sum / mask.sum()); verl verl/utils/torch_functional.py
    # masked_whiten (masked_mean = sum / (mask.sum() + 1e-8)); both: unbiased variance, rsqrt(var + 1e-8)
    n = sum(map(sum, mask))
    d = n + (1e-8 if eps_in_mean else 0.0)
    mean = sum(v * m for rv, rm in zip(values, mask) for v, m in zip(rv, rm)) / d
    var = sum((v - mean) ** 2 * m for rv, rm in zip(values, mask) for v, m in zip(rv, rm)) / d
    var *= n / (n - 1)
    return [[(v - mean) / math.sqrt(var + 1e-8) for v in row] for row in values]


def gae_trl(rewards, values, mask, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        lastgaelam = 0.0
        for t in reversed(range(T)):
            nextvalues = values[b][t + 1] if t < T - 1 else 0.0
            delta = rewards[b][t] + gamma * nextvalues - values[b][t]
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[b][t] = lastgaelam
    returns = [[adv[b][t] + values[b][t] for t in range(T)] for b in range(B)]
    w = whiten(adv, mask, eps_in_mean=False)
    # advantages = torch.masked_fill(advantages, padding_mask, 0)
    return {"advantages": [[w[b][t] * mask[b][t] for t in range(T)] for b in range(B)], "returns": returns}


def gae_verl(rewards, values, mask, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        nextvalues, lastgaelam = 0.0, 0.0
        for t in reversed(range(T)):
            delta = rewards[b][t] + gamma * nextvalues - values[b][t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            # skip values and TD-error on observation tokens
            nextvalues = values[b][t] * mask[b][t] + (1 - mask[b][t]) * nextvalues
            lastgaelam = lastgaelam_ * mask[b][t] + (1 - mask[b][t]) * lastgaelam
            adv[b][t] = lastgaelam_
    returns = [[adv[b][t] + values[b][t] for t in range(T)] for b in range(B)]
    return {"advantages": whiten(adv, mask, eps_in_mean=True), "returns": returns}


# ---- distillation: TRL GKDTrainer.generalized_jsd_loss --------------------------------------------

# ---- group advantages: TRL GRPOTrainer._generate_and_score_completions / verl core_algos -----------------

def std_unbiased(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def grpo_adv_trl(rewards, G, scale_rewards="group"):
    """trl/trainer/grpo_trainer.py _generate_and_score_completions: mean over rewards.view(-1, G); std of the
    group (rewards.view(-1, G).std(dim=1), unbiased) or of the batch (rewards.std()); advantages = rewards - mean,
    divided by (std + 1e-4) unless scale_rewards == "none"."""
    out, batch_std = [], std_unbiased(rewards)
    for i, r in enumerate(rewards):
        g = rewards[(i // G) * G:(i // G + 1) * G]
        a = r - sum(g) / G
        if scale_rewards == "group":
            a /= std_unbiased(g) + 1e-4
        elif scale_rewards == "batch":
            a /= batch_std + 1e-4
        out.append(a)
    return {"advantages": out}


def grpo_adv_verl(scores, index, mask, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """verl/trainer/ppo/core_algos.py compute_grpo_outcome_advantage: per uid, mean and torch.std (unbiased); a
    singleton gets mean 0 and std 1; (score - mean) / (std + epsilon), or score - mean; then
    scores.unsqueeze(-1) * response_mask."""
    out = []
    for i, sc in enumerate(scores):
        g = [scores[j] for j in range(len(scores)) if index[j] == index[i]]
        mean, std = (0.0, 1.0) if len(g) == 1 else (sum(g) / len(g), std_unbiased(g))
        a = (sc - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else sc - mean
        out.append([a * m for m in mask[i]])
    return {"advantages": out}


def rloo_adv_verl(scores, index, mask):
    """verl core_algos.compute_rloo_outcome_advantage: with n > 1 members, score * n/(n-1) - mean * n/(n-1); a
    singleton keeps its score; then times response_mask."""
    out = []
    for i, sc in enumerate(scores):
        g = [scores[j] for j in range(len(scores)) if index[j] == index[i]]
        n = len(g)
        a = sc if n == 1 else sc * n / (n - 1) - (sum(g) / n) * n / (n - 1)
        out.append([a * m for m in mask[i]])
    return {"advantages": out}


def gkd_jsd(student, teacher, labels, beta=0.5, temperature=1.0):
    B, T, V = len(student), len(student[0]), len(student[0][0])
    total, count = 0.0, 0
    grad = [[[0.0] * V for _ in range(T)] for _ in range(B)]
    per = {}
    for b in range(B):
        for t in range(T):
            if labels[b][t] == -100:  # mask = labels != -100; jsd = jsd[mask]
                continue
            s = log_softmax([x / temperature for x in student[b][t]])
            q = log_softmax([y / temperature for y in teacher[b][t]])
            ps, pt = [math.exp(v) for v in s], [math.exp(v) for v in q]
            if beta == 0:  # F.kl_div(student_log_probs, teacher_log_probs, log_target=True) = KL(teacher || student)
                val = sum(pt[i] * (q[i] - s[i]) for i in range(V))
                g = [-pt[i] / ps[i] for i in range(V)]  # d/ds_i (as probabilities)
            elif beta == 1:  # KL(student || teacher)
                val = sum(ps[i] * (s[i] - q[i]) for i in range(V))
                g = [s[i] - q[i] + 1 for i in range(V)]
            else:
                # mixture_log_probs = logsumexp(stack([s + log(1 - beta), t + log(beta)]))
                m = [math.log((1 - beta) * ps[i] + beta * pt[i]) for i in range(V)]
                kl_teacher = sum(pt[i] * (q[i] - m[i]) for i in range(V))
                kl_student = sum(ps[i] * (s[i] - m[i]) for i in range(V))
                val = beta * kl_teacher + (1 - beta) * kl_student
                g = [(1 - beta) * (s[i] - m[i]) for i in range(V)]  # d jsd / d p_student_i (derived by hand)
            total += val
            count += 1
            dot = sum(ps[i] * g[i] for i in range(V))
            per[(b, t)] = [ps[j] * (g[j] - dot) / temperature for j in range(V)]  # through softmax(x / tau)
    for (b, t), row in per.items():
        grad[b][t] = [v / count for v in row]  # batchmean over kept tokens: jsd.sum() / mask.sum()
    return {"loss": total / count, "student_logits.grad": grad}


# ---- fixtures ----------------------------------------------------------------------------------

tests = []  # (name, status, regex, args)


def test(name, status, regex, *args):
    tests.append((name, status, regex, list(args)))


def fx(name):
    return "${fixtures}/" + name


def worst_index(got, ref, tol=F64_TOL):
    """The flat index of the largest violation of |got - ref| <= atol + rtol |ref| (the tool's rule)."""
    g, r = flat(got), flat(ref)
    excess = [abs(a - b) - (tol[0] + tol[1] * abs(b)) for a, b in zip(g, r)]
    i = max(range(len(excess)), key=lambda k: excess[k])
    assert excess[i] > 0
    return i


def index_text(flat_index, shape):
    idx = []
    for d in reversed(shape):
        idx.append(flat_index % d)
        flat_index //= d
    return "\\[" + ", ".join(str(v) for v in reversed(idx)) + "\\]"


def main():
    rng = random.Random(20261201)

    # SFT ----------------------------------------------------------------------------------------
    B, T, V = 2, 4, 5
    logits = [[[rng.uniform(-3, 3) for _ in range(V)] for _ in range(T)] for _ in range(B)]
    labels = [[rng.randrange(V) for _ in range(T)] for _ in range(B)]
    labels[0][0] = -100  # a prompt token (its shifted target position is never read: labels[.][0] is no target)
    labels[1][2] = -100  # an ignored target
    out = sft(logits, labels)
    dump("sft_f64.safetensors", "F64", {"logits": logits, "labels": labels}, out, {"labels"}, corpus=True)
    test("sft float64", 0, "result: PASS \\(3 compared", fx("sft_f64.safetensors"), "--loss", "sft")
    l32 = round_all(logits)
    dump("sft_f32.safetensors", "F32", {"logits": l32, "labels": labels}, round_all(sft(l32, labels)), {"labels"})
    test("sft float32", 0, "logits.grad +\\[2, 4, 5\\] +F32 .*PASS", fx("sft_f32.safetensors"), "--loss", "sft")
    out_n = sft(logits, labels, num_items_in_batch=11)
    dump("sft_items_f64.safetensors", "F64", {"logits": logits, "labels": labels}, out_n, {"labels"})
    test("sft num_items_in_batch", 0, "result: PASS", fx("sft_items_f64.safetensors"), "--loss", "sft", "--set",
         "num_items_in_batch=11")
    test("sft num_items_in_batch omitted fails", 1, "loss .*FAIL", fx("sft_items_f64.safetensors"), "--loss", "sft")
    # one element of the gradient off by 1e-6
    bad = json.loads(json.dumps(out))
    bad["logits.grad"][1][2][3] += 1e-6
    dump("sft_wrong_element_f64.safetensors", "F64", {"logits": logits, "labels": labels}, bad, {"labels"})
    test("sft one gradient element off", 1, "logits.grad .*FAIL .*worst at \\[1, 2, 3\\]",
         fx("sft_wrong_element_f64.safetensors"), "--loss", "sft")

    # DPO ----------------------------------------------------------------------------------------
    B = 6
    chosen = [rng.uniform(-60, -10) for _ in range(B)]
    rejected = [rng.uniform(-60, -10) for _ in range(B)]
    ref_c = [c + rng.uniform(-4, 4) for c in chosen]
    ref_r = [r + rng.uniform(-4, 4) for r in rejected]
    ins = {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    for loss_type, beta in (("sigmoid", 0.1), ("hinge", 0.1), ("ipo", 0.5)):
        name = "dpo_%s_f64.safetensors" % loss_type
        dump(name, "F64", ins, dpo(chosen, rejected, ref_c, ref_r, loss_type, beta), corpus=loss_type == "sigmoid")
        test("dpo %s float64" % loss_type, 0, "result: PASS \\(6 compared", fx(name), "--loss", "dpo", "--set",
             "loss_type=%s,beta=%g" % (loss_type, beta))
    ins32 = {k: round_all(v) for k, v in ins.items()}
    dump("dpo_sigmoid_f32.safetensors", "F32", ins32,
         round_all(dpo(*(ins32[k] for k in ins), "sigmoid", 0.1, 0.1)))
    test("dpo sigmoid cDPO float32", 0, "result: PASS", fx("dpo_sigmoid_f32.safetensors"), "--loss", "dpo", "--set",
         "loss_type=sigmoid,beta=0.1,label_smoothing=0.1")
    # TRL's own key names through --map
    good = dpo(chosen, rejected, ref_c, ref_r, "sigmoid", 0.1)
    renamed = {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected, "reference_chosen_logps": ref_c,
               "ref_rej": ref_r}
    dump("dpo_renamed_f64.safetensors", "F64", renamed, {"losses": good["losses"]})
    test("dpo aliases and --map", 0, "losses .*PASS", fx("dpo_renamed_f64.safetensors"), "--loss", "dpo", "--map",
         "ref_rejected_logps=ref_rej")
    test("dpo renamed key without --map", 2, "missing input tensor\\(s\\) ref_rejected_logps",
         fx("dpo_renamed_f64.safetensors"), "--loss", "dpo")
    # wrong: one element off
    bad = dict(good, losses=list(good["losses"]))
    bad["losses"][4] += 1e-7
    dump("dpo_wrong_element_f64.safetensors", "F64", ins, bad)
    test("dpo one loss element off", 1, "losses .*FAIL +1 element\\(s\\) out of tolerance; worst at \\[4\\]",
         fx("dpo_wrong_element_f64.safetensors"), "--loss", "dpo")
    # wrong: the trainer used beta = 0.2, the spec says 0.1
    wrong_beta = dpo(chosen, rejected, ref_c, ref_r, "sigmoid", 0.2)
    dump("dpo_wrong_beta_f64.safetensors", "F64", ins, wrong_beta)
    i = worst_index(wrong_beta["chosen_rewards"], good["chosen_rewards"])
    test("dpo wrong beta", 1, "chosen_rewards .*FAIL .*worst at \\[%d\\]" % i, fx("dpo_wrong_beta_f64.safetensors"),
         "--loss", "dpo", "--set", "beta=0.1")
    test("dpo wrong beta passes with its beta", 0, "result: PASS", fx("dpo_wrong_beta_f64.safetensors"), "--loss",
         "dpo", "--set", "beta=0.2")
    test("dpo unknown loss_type lists the valid ones", 2, "unknown value for --loss dpo; valid: sigmoid, hinge, ipo",
         fx("dpo_sigmoid_f64.safetensors"), "--loss", "dpo", "--set", "loss_type=sigmoidal")
    test("dpo unknown key lists the valid ones", 2, "unknown key 'betta' .*valid: loss_type, beta, label_smoothing",
         fx("dpo_sigmoid_f64.safetensors"), "--loss", "dpo", "--set", "betta=0.1")
    test("dpo bad number", 2, "beta=abc: not a finite number", fx("dpo_sigmoid_f64.safetensors"), "--loss", "dpo",
         "--set", "beta=abc")
    # a shape that disagrees with the others
    ins_bad = dict(ins, rejected_logps=rejected[:5])
    dump("dpo_inconsistent_shapes_f64.safetensors", "F64", ins_bad, {"loss": good["loss"]})
    test("dpo inconsistent shapes", 2, "rejected_logps.*\\[5\\]", fx("dpo_inconsistent_shapes_f64.safetensors"),
         "--loss", "dpo")
    # nothing to compare
    dump("dpo_inputs_only_f64.safetensors", "F64", ins, {})
    test("dpo dump without outputs", 2, "none of the outputs", fx("dpo_inputs_only_f64.safetensors"), "--loss", "dpo")

    # GRPO ---------------------------------------------------------------------------------------
    B, T = 4, 5
    lengths = [5, 3, 4, 2]
    mask = [[1.0 if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    logps = [[rng.uniform(-3, -0.1) for _ in range(T)] for _ in range(B)]
    old = [[lp + rng.uniform(-0.4, 0.4) for lp in row] for row in logps]
    ref = [[lp + rng.uniform(-0.5, 0.5) for lp in row] for row in logps]
    adv = [1.2, -0.7, 0.4, -1.5]
    g_ins = {"log_probs": logps, "old_log_probs": old, "ref_log_prob": ref, "advantages": adv, "response_mask": mask}
    cases = [("grpo", dict(loss_type="grpo", epsilon=0.2, beta=0.04), "loss_type=grpo,epsilon=0.2,beta=0.04"),
             ("dapo", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04),
              "loss_type=dapo,epsilon=0.2,epsilon_high=0.28,beta=0.04"),
             ("dr_grpo", dict(loss_type="dr_grpo", epsilon=0.2, beta=0.0, max_completion_length=8),
              "loss_type=dr_grpo,max_completion_length=8"),
             ("bnpo", dict(loss_type="bnpo", epsilon=0.1, beta=0.1), "loss_type=bnpo,epsilon=0.1,beta=0.1")]
    for tag, kw, spec in cases:
        name = "grpo_%s_f64.safetensors" % tag
        out = grpo(logps, old, ref, adv, mask, **kw)
        dump(name, "F64", g_ins, out, corpus=tag == "dapo")
        test("grpo %s float64" % tag, 0, "result: PASS \\(4 compared", fx(name), "--loss", "grpo", "--set", spec)
    g32 = {k: round_all(v) for k, v in g_ins.items()}
    out32 = round_all(grpo(g32["log_probs"], g32["old_log_probs"], g32["ref_log_prob"], g32["advantages"],
                           g32["response_mask"], loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04))
    dump("grpo_dapo_f32.safetensors", "F32", g32, out32)
    test("grpo dapo float32", 0, "result: PASS", fx("grpo_dapo_f32.safetensors"), "--loss", "grpo", "--set",
         "loss_type=dapo,epsilon=0.2,epsilon_high=0.28,beta=0.04")
    # TRL names (per_token_logps, completion_mask, ...) are aliases
    trl = {"per_token_logps": logps, "old_per_token_logps": old, "ref_per_token_logps": ref, "advantages": adv,
           "completion_mask": mask}
    out = grpo(logps, old, ref, adv, mask, loss_type="dapo", beta=0.04)
    dump("grpo_trl_names_f64.safetensors", "F64", trl, {"loss": out["loss"], "per_token_logps.grad": out["log_probs.grad"]})
    test("grpo TRL names", 0, "log_probs.grad .*PASS", fx("grpo_trl_names_f64.safetensors"), "--loss", "grpo", "--set",
         "beta=0.04")
    # wrong: sign flip of the advantages in the trainer's gradient (one row)
    good = grpo(logps, old, ref, adv, mask, loss_type="grpo", epsilon=0.2, beta=0.04)
    flipped = grpo(logps, old, ref, [adv[0], -adv[1], adv[2], adv[3]], mask, loss_type="grpo", epsilon=0.2, beta=0.04)
    bad = dict(good, **{"log_probs.grad": flipped["log_probs.grad"]})
    dump("grpo_sign_flip_f64.safetensors", "F64", g_ins, bad)
    i = worst_index(flipped["log_probs.grad"], good["log_probs.grad"])
    test("grpo sign flip of one row's advantage", 1, "log_probs.grad .*FAIL .*worst at %s" % index_text(i, [B, T]),
         fx("grpo_sign_flip_f64.safetensors"), "--loss", "grpo", "--set", "loss_type=grpo,epsilon=0.2,beta=0.04")
    test("grpo beta without ref_log_prob", 2, "needs the reference log-probs", fx("dpo_sigmoid_f64.safetensors"),
         "--loss", "grpo", "--map", "log_probs=losses,advantages=losses,response_mask=losses", "--set", "beta=0.1")

    # PPO (verl) ---------------------------------------------------------------------------------
    adv_t = [[rng.uniform(-1.5, 1.5) for _ in range(T)] for _ in range(B)]
    old_p = [[lp_ + rng.uniform(-0.5, 0.5) for lp_ in row] for row in logps]
    old_p[1][0] = logps[1][0] + 1.6  # ratio e^-1.6 = 0.2 with A < 0: the dual clip (c = 3) bounds it
    adv_t[1][0] = -1.0
    old_p[0][1] = logps[0][1] - 25.0  # log ratio beyond verl's clamp at 20
    p_ins = {"log_prob": logps, "old_log_prob": old_p, "advantages": adv_t, "response_mask": mask}
    for mode, kw, spec in (("token-mean", dict(clip_ratio=0.2), "clip_ratio=0.2,loss_agg_mode=token-mean"),
                           ("seq-mean-token-mean", dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.0),
                            "clip_ratio_low=0.2,clip_ratio_high=0.28,clip_ratio_c=2,loss_agg_mode=seq-mean-token-mean"),
                           ("seq-mean-token-sum", dict(), "loss_agg_mode=seq-mean-token-sum"),
                           ("seq-mean-token-sum-norm", dict(), "loss_agg_mode=seq-mean-token-sum-norm")):
        out = ppo_verl(logps, old_p, adv_t, mask, loss_agg_mode=mode, **kw)
        name = "ppo_verl_%s_f64.safetensors" % mode
        dump(name, "F64", p_ins, out)
        test("ppo verl %s float64" % mode, 0, "preset verl.*result: PASS \\(6 compared", fx(name), "--loss", "ppo",
             "--preset", "verl", "--set", spec)
    good = ppo_verl(logps, old_p, adv_t, mask)
    bad = dict(good, pg_losses=json.loads(json.dumps(good["pg_losses"])))
    bad["pg_losses"][2][3] *= 1.0 + 1e-6
    dump("ppo_wrong_element_f64.safetensors", "F64", p_ins, bad)
    test("ppo one per-token element off", 1, "per_token_loss .*FAIL +1 element\\(s\\) .*worst at \\[2, 3\\]",
         fx("ppo_wrong_element_f64.safetensors"), "--loss", "ppo")
    test("ppo unknown preset", 2, "--preset trl: unknown for --loss ppo; valid: verl",
         fx("ppo_wrong_element_f64.safetensors"), "--loss", "ppo", "--preset", "trl")
    test("ppo unknown loss_agg_mode", 2, "valid: token-mean, seq-mean-token-sum, seq-mean-token-mean",
         fx("ppo_wrong_element_f64.safetensors"), "--loss", "ppo", "--set", "loss_agg_mode=mean")

    # reward model (TRL) -------------------------------------------------------------------------
    rc = [rng.uniform(-2, 2) for _ in range(5)]
    rr = [rng.uniform(-2, 2) for _ in range(5)]
    margin = [rng.uniform(0, 1) for _ in range(5)]
    dump("reward_f64.safetensors", "F64", {"rewards_chosen": rc, "rewards_rejected": rr},
         reward_model(rc, rr))
    test("reward model float64", 0, "result: PASS \\(3 compared", fx("reward_f64.safetensors"), "--loss", "reward")
    dump("reward_margin_center_f64.safetensors", "F64", {"rewards_chosen": rc, "rewards_rejected": rr,
                                                         "margin": margin},
         reward_model(rc, rr, margin, 0.01))
    test("reward model margin and centring float64", 0, "result: PASS", fx("reward_margin_center_f64.safetensors"),
         "--loss", "reward", "--set", "center_rewards_coefficient=0.01")
    test("reward model without its centring fails", 1, "loss .*FAIL", fx("reward_margin_center_f64.safetensors"),
         "--loss", "reward")
    rc32, rr32 = round_all(rc), round_all(rr)
    dump("reward_f32.safetensors", "F32", {"rewards_chosen": rc32, "rewards_rejected": rr32},
         round_all(reward_model(rc32, rr32)))
    test("reward model float32", 0, "rewards_chosen.grad +\\[5\\] +F32 .*PASS", fx("reward_f32.safetensors"),
         "--loss", "reward")

    # GAE (TRL, verl) ----------------------------------------------------------------------------
    rew = [[0.0] * T for _ in range(B)]
    for b in range(B):
        rew[b][lengths[b] - 1] = rng.uniform(-1, 2)  # the score on the last response token
        for t in range(lengths[b]):
            rew[b][t] -= 0.01 * rng.uniform(0, 1)  # a per-token KL penalty
    vals = [[rng.uniform(-1, 1) if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    gae_ins = {"rewards": rew, "values": vals, "response_mask": mask}
    dump("gae_trl_f64.safetensors", "F64", gae_ins, gae_trl(rew, vals, mask, 1.0, 0.95))
    test("gae trl float64", 0, "preset trl.*result: PASS \\(2 compared", fx("gae_trl_f64.safetensors"), "--loss",
         "gae", "--preset", "trl", "--set", "gamma=1.0,lam=0.95")
    # verl: a multi-turn mask with a tool reply (mask 0) inside the response
    mt_mask = [row[:] for row in mask]
    mt_mask[0][2] = 0.0
    verl_out = gae_verl(rew, vals, mt_mask, 0.99, 1.0)
    dump("gae_verl_f64.safetensors", "F64", {"token_level_rewards": rew, "values": vals, "response_mask": mt_mask},
         verl_out)
    test("gae verl float64", 0, "preset verl.*result: PASS \\(2 compared", fx("gae_verl_f64.safetensors"), "--loss",
         "gae", "--preset", "verl", "--set", "gamma=0.99,lam=1.0")
    test("gae verl dump checked as trl fails", 1, "advantages .*FAIL", fx("gae_verl_f64.safetensors"), "--loss", "gae",
         "--preset", "trl", "--set", "gamma=0.99,lam=1.0")
    bad = dict(verl_out, returns=json.loads(json.dumps(verl_out["returns"])))
    bad["returns"][3][1] += 1e-8
    dump("gae_wrong_element_f64.safetensors", "F64", {"token_level_rewards": rew, "values": vals,
                                                      "response_mask": mt_mask}, bad)
    test("gae one return off", 1, "returns .*FAIL +1 element\\(s\\) .*worst at \\[3, 1\\]",
         fx("gae_wrong_element_f64.safetensors"), "--loss", "gae", "--preset", "verl", "--set", "gamma=0.99,lam=1.0")

    # group advantages (TRL GRPO, verl GRPO / RLOO) ------------------------------------------------
    arng = random.Random(2026)  # its own stream: the fixtures after this section keep their values
    G = 4
    rw = [round(arng.uniform(0, 1), 3) for _ in range(3 * G)]
    rw[4:8] = [0.5] * 4  # an all-equal group: advantage 0 (std 0 + epsilon)
    for scale in ("group", "batch", "none"):
        name = "adv_trl_%s_f64.safetensors" % scale
        dump(name, "F64", {"rewards": rw}, grpo_adv_trl(rw, G, scale))
        test("advantages trl scale_rewards=%s float64" % scale, 0, "preset trl.*result: PASS \\(1 compared", fx(name),
             "--loss", "advantages", "--set", "num_generations=%d,scale_rewards=%s" % (G, scale))
    test("advantages trl group dump checked with batch scaling fails", 1, "advantages .*FAIL",
         fx("adv_trl_group_f64.safetensors"), "--loss", "advantages", "--set", "num_generations=4,scale_rewards=batch")
    test("advantages without index or num_generations", 2, "pass --set num_generations",
         fx("adv_trl_group_f64.safetensors"), "--loss", "advantages")
    test("advantages num_generations not dividing N", 2, "must be a positive integer dividing N = 12",
         fx("adv_trl_group_f64.safetensors"), "--loss", "advantages", "--set", "num_generations=5")
    # verl: uids out of order, groups of 3, 2 and a singleton, a multi-turn response mask
    sc = [round(arng.uniform(-1, 2), 3) for _ in range(6)]
    uid = [7, 3, 7, 11, 3, 7]
    vmask = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]]
    v_ins = {"scores": sc, "uid": uid, "response_mask": vmask}
    dump("adv_verl_grpo_f64.safetensors", "F64", v_ins, grpo_adv_verl(sc, uid, vmask), {"uid"})
    test("advantages verl grpo float64", 0, "preset verl.*result: PASS \\(1 compared",
         fx("adv_verl_grpo_f64.safetensors"), "--loss", "advantages", "--preset", "verl")
    dump("adv_verl_grpo_nostd_f64.safetensors", "F64", v_ins,
         grpo_adv_verl(sc, uid, vmask, norm_adv_by_std_in_grpo=False), {"uid"})
    test("advantages verl grpo without std float64", 0, "result: PASS", fx("adv_verl_grpo_nostd_f64.safetensors"),
         "--loss", "advantages", "--preset", "verl", "--set", "scale_rewards=none")
    dump("adv_verl_rloo_f64.safetensors", "F64", v_ins, rloo_adv_verl(sc, uid, vmask), {"uid"})
    test("advantages verl rloo float64", 0, "result: PASS", fx("adv_verl_rloo_f64.safetensors"), "--loss",
         "advantages", "--preset", "verl", "--set", "estimator=rloo")
    test("advantages verl rloo dump checked as grpo fails", 1, "advantages .*FAIL",
         fx("adv_verl_rloo_f64.safetensors"), "--loss", "advantages", "--preset", "verl")
    good = grpo_adv_verl(sc, uid, vmask)
    bad = {"advantages": json.loads(json.dumps(good["advantages"]))}
    bad["advantages"][2][3] = -bad["advantages"][2][3]
    dump("adv_verl_sign_flip_f64.safetensors", "F64", v_ins, bad, {"uid"})
    test("advantages verl sign flip of one element", 1, "advantages .*FAIL +1 element\\(s\\) .*worst at \\[2, 3\\]",
         fx("adv_verl_sign_flip_f64.safetensors"), "--loss", "advantages", "--preset", "verl")

    # distillation (TRL GKD) ---------------------------------------------------------------------
    Bd, Td, Vd = 2, 3, 6
    stu = [[[rng.uniform(-2, 2) for _ in range(Vd)] for _ in range(Td)] for _ in range(Bd)]
    tea = [[[rng.uniform(-2, 2) for _ in range(Vd)] for _ in range(Td)] for _ in range(Bd)]
    lab = [[rng.randrange(Vd) for _ in range(Td)] for _ in range(Bd)]
    lab[1][0] = -100
    d_ins = {"student_logits": stu, "teacher_logits": tea, "labels": lab}
    for beta, tau in ((0.5, 1.0), (0.1, 0.9), (0.0, 1.0), (1.0, 2.0)):
        name = "distill_jsd_b%g_t%g_f64.safetensors" % (beta, tau)
        dump(name, "F64", d_ins, gkd_jsd(stu, tea, lab, beta, tau), {"labels"})
        test("distill gkd beta %g temperature %g float64" % (beta, tau), 0, "result: PASS \\(2 compared", fx(name),
             "--loss", "distill", "--set", "beta=%g,temperature=%g" % (beta, tau))
    good = gkd_jsd(stu, tea, lab, 0.5, 1.0)
    bad = dict(good, **{"student_logits.grad": json.loads(json.dumps(good["student_logits.grad"]))})
    bad["student_logits.grad"][0][2][4] = -bad["student_logits.grad"][0][2][4]
    dump("distill_sign_flip_f64.safetensors", "F64", d_ins, bad, {"labels"})
    test("distill sign flip of one gradient element", 1,
         "student_logits.grad .*FAIL +1 element\\(s\\) .*worst at \\[0, 2, 4\\]", fx("distill_sign_flip_f64.safetensors"),
         "--loss", "distill")

    # KL -----------------------------------------------------------------------------------------
    lp = [[rng.uniform(-4, -0.1) for _ in range(T)] for _ in range(B)]
    rf = [[v + rng.uniform(-1.5, 1.5) for v in row] for row in lp]
    rf[2][1] = lp[2][1] + 25.0  # beyond verl's clamps: low_var_kl's value is clamped to 10, its gradient 0
    k_ins = {"log_probs": lp, "ref_log_prob": rf, "response_mask": mask}
    for name in ("low_var_kl", "kl", "abs", "mse", "k3+"):
        file = "kl_%s_f64.safetensors" % name.replace("+", "_plus")
        dump(file, "F64", k_ins, kl_penalty(lp, rf, name, mask), corpus=name == "low_var_kl")
        test("kl %s float64" % name, 0, "result: PASS \\(3 compared", fx(file), "--loss", "kl", "--set",
             "kl_penalty=" + name)
    good = kl_penalty(lp, rf, "low_var_kl", mask)
    bad = dict(good, **{"log_probs.grad": json.loads(json.dumps(good["log_probs.grad"]))})
    bad["log_probs.grad"][0][3] = -bad["log_probs.grad"][0][3]
    dump("kl_sign_flip_f64.safetensors", "F64", k_ins, bad)
    test("kl sign flip of one gradient element", 1, "log_probs.grad .*FAIL +1 element\\(s\\) .*worst at \\[0, 3\\]",
         fx("kl_sign_flip_f64.safetensors"), "--loss", "kl", "--set", "kl_penalty=low_var_kl")
    test("kl wrong estimator", 1, "kl .*FAIL", fx("kl_low_var_kl_f64.safetensors"), "--loss", "kl", "--set",
         "kl_penalty=mse")
    test("kl unknown estimator", 2, "valid: kl, k1, abs, mse", fx("kl_kl_f64.safetensors"), "--loss", "kl", "--set",
         "kl_penalty=full")

    # malformed files ----------------------------------------------------------------------------
    good_bytes = open(os.path.join(OUT, "dpo_sigmoid_f64.safetensors"), "rb").read()
    save("bad_truncated.safetensors", good_bytes[:-13], corpus=True)
    test("malformed: truncated data", 2, "truncated or the offsets are wrong", fx("bad_truncated.safetensors"), "--loss",
         "dpo")
    save("bad_short.safetensors", good_bytes[:5], corpus=True)
    test("malformed: shorter than 8 bytes", 2, "truncated: 5 bytes", fx("bad_short.safetensors"), "--loss", "dpo")
    save("bad_header_length.safetensors", struct.pack("<Q", 1 << 20) + b"{}", corpus=True)
    test("malformed: header length past the end", 2, "the header length says 1048576 bytes but only 2 follow",
         fx("bad_header_length.safetensors"), "--loss", "dpo")
    save("bad_json.safetensors", raw_file('{"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},}', b"\0" * 8),
         corpus=True)
    test("malformed: bad header JSON", 2, "bad header JSON at byte", fx("bad_json.safetensors"), "--loss", "dpo")
    save("bad_dtype.safetensors", raw_file('{"chosen_logps":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}',
                                           b"\0\0"), corpus=True)
    test("malformed: unknown dtype", 2, "tensor 'chosen_logps': unknown dtype \"F8_E4M3\"", fx("bad_dtype.safetensors"),
         "--loss", "dpo")
    save("bad_offsets.safetensors", raw_file('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 12),
         corpus=True)
    test("malformed: offsets past the end", 2, "tensor 'a': data_offsets \\[0, 16\\] reach past the end",
         fx("bad_offsets.safetensors"), "--loss", "dpo")
    save("bad_overlap.safetensors", raw_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                             '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12),
         corpus=True)
    test("malformed: overlapping tensors", 2, "tensor 'b' .* overlaps tensor 'a'", fx("bad_overlap.safetensors"),
         "--loss", "dpo")
    save("bad_gap.safetensors", raw_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                         '"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', b"\0" * 12),
         corpus=True)
    test("malformed: a gap in the data", 2, "bytes \\[4, 8\\) of the data area belong to no tensor",
         fx("bad_gap.safetensors"), "--loss", "dpo")
    save("bad_shape_bytes.safetensors", raw_file('{"a":{"dtype":"F64","shape":[3],"data_offsets":[0,16]}}',
                                                 b"\0" * 16), corpus=True)
    test("malformed: shape and byte length disagree", 2, "needs 24 bytes but data_offsets \\[0, 16\\] hold 16",
         fx("bad_shape_bytes.safetensors"), "--loss", "dpo")
    save("bad_overflow.safetensors",
         raw_file('{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}', b""), corpus=True)
    test("malformed: element count overflows", 2, "has too many elements", fx("bad_overflow.safetensors"), "--loss",
         "dpo")
    test("missing file", 2, "cannot open", fx("no_such_file.safetensors"), "--loss", "dpo")
    test("unknown loss", 2, "unknown loss 'dpoo'; valid: sft, dpo, grpo, kl", fx("dpo_sigmoid_f64.safetensors"),
         "--loss", "dpoo")
    test("template grpo", 0, "old_log_probs .*old_per_token_logps", "--template", "grpo")
    test("json report", 0, "\"pass\": true", fx("dpo_sigmoid_f64.safetensors"), "--loss", "dpo", "--json")
    test("explain", 0, "log sigmoid\\(beta h\\)", fx("dpo_sigmoid_f64.safetensors"), "--loss", "dpo", "--explain")

    with open(TESTS, "w") as f:
        f.write("# Generated by tests/reference/make_verify_fixtures.py: posttrain-verify on each fixture, with the\n"
                "# expected exit status and a regular expression its output must match. Do not edit by hand.\n")
        for name, status, regex, args in tests:
            quoted = " ".join('"%s"' % a for a in args)
            f.write('posttrain_verify_test("%s" %d "%s" %s)\n' % (name, status, regex.replace("\\", "\\\\").replace(
                '"', '\\"'), quoted))
    print("wrote %d fixtures under %s and %d tests to %s" % (len(os.listdir(OUT)), OUT, len(tests), TESTS))


if __name__ == "__main__":
    main()
