#!/usr/bin/env python3
"""Golden values for tests/eigen/test_peer_conventions.cpp (issue 17, exact peer conventions).

Each function below re-states one framework's formula the way the framework writes it, with plain Python
floats (float64, no torch, no numpy), on small fixed inputs, and the script prints a C++ header:

    python3 tests/reference/make_golden_conventions.py > tests/reference/golden_conventions.hpp

Sources (read, not copied; the arithmetic is re-typed in the order the framework performs it):
  verl b178a3c      verl/utils/torch_functional.py   masked_mean, masked_var, masked_whiten
                    verl/trainer/ppo/core_algos.py   agg_loss, compute_gae_advantage_return,
                                                     compute_policy_loss_vanilla, compute_value_loss
                    verl/workers/critic/dp_critic.py critic/vpred_mean
  OpenRLHF 3c3be62  openrlhf/models/loss.py          aggregate_loss, PolicyLoss.forward (policy_loss_type
                                                     "gspo")
                    openrlhf/models/utils.py         compute_approx_kl, compute_reward
  OpenRLHF 0489850  openrlhf/models/loss.py          VanillaKTOLoss.forward (removed in 3c3be62)
  TRL f2cd577       trl/trainer/grpo_trainer.py      GRPOTrainer._compute_loss (loss_type "grpo"),
                                                     _generate_and_score_completions (multi_objective_aggregation,
                                                     scale_rewards="batch", frac_reward_zero_std)
                    trl/trainer/utils.py             nanstd
                    trl/trainer/dpo_trainer.py       DPOTrainer._compute_loss (use_weighting: WPO weights)
                    openrlhf/trainer/ppo_utils/experience_maker.py
                                                     compute_advantages_and_returns, get_cumulative_returns
"""
import math
import sys

B, T = 3, 5
X = [0.7, -1.3, 2.1, 5.0, -0.4,
     1.9, 0.25, -0.8, 1.1, 3.3,
     -2.2, 0.6, 1.4, -0.9, 0.05]
M = [1, 1, 1, 0, 0,
     1, 0, 1, 1, 1,
     0, 0, 0, 0, 0]
# Nearly constant values: the biased variance (about 3e-11) sits below OpenRLHF's 1e-8 floor. The offsets are
# multiples of 2^-18, so every sum is exact and the tiny deviations do not depend on the summation order.
U = 2.0 ** -18
XC = [1.0, 1.0 + 4 * U, 1.0 - 3 * U, 7.0, 1.0 + U,
      1.0 - 2 * U, 9.0, 1.0 + 5 * U, 1.0, 1.0 - U,
      -4.0, 1.0, 1.0 + 2 * U, 1.0, 3.0]
MC = [1, 1, 1, 0, 1,
      1, 0, 1, 1, 1,
      0, 1, 1, 1, 0]


def rows(v):
    return [v[b * T:(b + 1) * T] for b in range(B)]


# ---- verl/utils/torch_functional.py ----------------------------------------------------------------
def verl_masked_sum(values, mask):
    return sum(v * m for v, m in zip(values, mask))


def verl_masked_mean(values, mask):
    # masked_mean: s / (mask.sum(axis) + 1e-8)
    return verl_masked_sum(values, mask) / (sum(mask) + 1e-8)


def verl_masked_var(values, mask, unbiased=True):
    # masked_var: mean = masked_mean; variance = masked_mean(centered**2); * mask_sum / (mask_sum - 1)
    mean = verl_masked_mean(values, mask)
    centered = [v - mean for v in values]
    variance = verl_masked_mean([c ** 2 for c in centered], mask)
    if unbiased:
        mask_sum = sum(mask)
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def verl_masked_whiten(values, mask):
    # masked_whiten(shift_mean=True): (values - mean) * rsqrt(var + 1e-8) at every position
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    rstd = 1.0 / math.sqrt(var + 1e-8)
    return [(v - mean) * rstd for v in values]


# ---- OpenRLHF experience_maker.py compute_advantages_and_returns (normalisation) ---------------------
def openrlhf_normalize(adv, mask, std_norm=True):
    num_actions = sum(mask)
    mean = sum(a * m for a, m in zip(adv, mask)) / num_actions
    if std_norm:
        var = sum((a - mean) ** 2 * m for a, m in zip(adv, mask)) / num_actions
        rstd = 1.0 / math.sqrt(max(var, 1e-8))  # var.clamp(min=1e-8).rsqrt()
    else:
        rstd = 1
    return [(a - mean) * rstd for a in adv]  # every position, padding included


# ---- verl core_algos.agg_loss "seq-mean-token-mean" / OpenRLHF loss.aggregate_loss(token_level_loss=False)
def verl_seq_mean_token_mean(loss, mask, global_batch_size=None):
    seq_losses, seq_mask = [], []
    for lr, mr in zip(rows(loss), rows(mask)):
        n = sum(mr)
        seq_losses.append(sum(l * m for l, m in zip(lr, mr)) / (n + 1e-8))
        seq_mask.append(1.0 if n > 0 else 0.0)
    if global_batch_size is None:
        global_batch_size = sum(seq_mask)
    return sum(s * k for s, k in zip(seq_losses, seq_mask)) / global_batch_size


def verl_seq_mean_token_mean_grad(mask, global_batch_size=None):
    # d agg_loss / d loss_mat: the loss is linear in loss_mat, so this is its coefficient
    counts = [sum(mr) for mr in rows(mask)]
    if global_batch_size is None:
        global_batch_size = sum(1.0 for n in counts if n > 0)
    out = []
    for b, mr in enumerate(rows(mask)):
        n = counts[b]
        out += [m / (n + 1e-8) * (1.0 if n > 0 else 0.0) / global_batch_size for m in mr]
    return out


def openrlhf_sample_level(loss, mask):
    token_counts = [sum(mr) for mr in rows(mask)]
    seq_loss = [sum(l * m for l, m in zip(lr, mr)) / (n + 1e-8)
                for lr, mr, n in zip(rows(loss), rows(mask), token_counts)]
    seq_mask = [1.0 if n > 0 else 0.0 for n in token_counts]
    # masked_mean(seq_loss, seq_mask) (openrlhf/models/utils.py: no guard)
    return sum(s * k for s, k in zip(seq_loss, seq_mask)) / sum(seq_mask)


# ---- verl core_algos.compute_gae_advantage_return ------------------------------------------------------
def verl_gae(rewards, values, mask, gamma, lam):
    R, V, Mk = rows(rewards), rows(values), rows(mask)
    adv_rows = [[0.0] * T for _ in range(B)]
    for b in range(B):
        nextvalues, lastgaelam = 0.0, 0.0
        for t in reversed(range(T)):
            delta = R[b][t] + gamma * nextvalues - V[b][t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            m = Mk[b][t]
            nextvalues = V[b][t] * m + (1 - m) * nextvalues
            lastgaelam = lastgaelam_ * m + (1 - m) * lastgaelam
            adv_rows[b][t] = lastgaelam
    adv = [a for r in adv_rows for a in r]
    returns = [a + v for a, v in zip(adv, values)]
    return verl_masked_whiten(adv, mask), returns, adv


# ---- verl core_algos.compute_policy_loss_vanilla (metrics) + agg_loss -----------------------------------
def verl_policy_loss(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, clip_c, mode):
    nak = [max(-20.0, min(20.0, a - b)) for a, b in zip(log_prob, old_log_prob)]
    ratio = [math.exp(x) for x in nak]
    ppo_kl = verl_masked_mean([-x for x in nak], mask)
    pg1 = [-A * r for A, r in zip(advantages, ratio)]
    pg2 = [-A * min(max(r, 1 - clip_low), 1 + clip_high) for A, r in zip(advantages, ratio)]
    cpg1 = [max(a, b) for a, b in zip(pg1, pg2)]
    pg_clipfrac = verl_masked_mean([1.0 if b > a else 0.0 for a, b in zip(pg1, pg2)], mask)
    pg3 = [-A * clip_c for A in advantages]
    cpg2 = [min(a, b) for a, b in zip(pg3, cpg1)]
    lower = verl_masked_mean([(1.0 if c > p else 0.0) * (1.0 if A < 0 else 0.0)
                              for c, p, A in zip(cpg1, pg3, advantages)], mask)
    pg_losses = [c2 if A < 0 else c1 for A, c1, c2 in zip(advantages, cpg1, cpg2)]
    if mode == "token-mean":
        loss = verl_masked_sum(pg_losses, mask) / sum(mask)
    else:
        loss = verl_seq_mean_token_mean(pg_losses, mask)
    return loss, pg_clipfrac, lower, ppo_kl


# ---- OpenRLHF models/utils.py compute_approx_kl("k1") + compute_reward ---------------------------------
def openrlhf_reward(r, kl_coef, log_probs, log_probs_base, mask, clip_range):
    kl = [max(-10.0, min(10.0, a - b)) for a, b in zip(log_probs, log_probs_base)]
    if kl_coef <= 0.0:
        kl_coef = 0.0
    if clip_range:
        r = [max(clip_range[0], min(clip_range[1], x)) for x in r]
    kl_reward = [-kl_coef * k for k in kl]
    out = []
    for b, mr in enumerate(rows(mask)):
        eos = max(t for t in range(T) if mr[t] > 0.5)  # the last kept token
        out += [kl_reward[b * T + t] + (r[b] if t == eos else 0.0) for t in range(T)]
    return out


# ---- OpenRLHF reinforce_baseline (experience_maker.py compute_advantages_and_returns) -------------------
def openrlhf_reinforce_baseline(scores, n_samples, kl_coef, log_probs, log_probs_base, mask, b, t):
    global B, T
    saved = (B, T)
    B, T = b, t
    # rewards = rewards - rewards.mean(-1, keepdim=True) over each prompt's n_samples_per_prompt (contiguous)
    centred = []
    for p in range(b // n_samples):
        grp = scores[p * n_samples:(p + 1) * n_samples]
        mean = sum(grp) / n_samples
        centred += [x - mean for x in grp]
    reward = openrlhf_reward(centred, kl_coef, log_probs, log_probs_base, mask, None)
    # get_cumulative_returns(gamma = 1): rewards = action_mask * rewards; cumulative = r_t + gamma * cumulative
    returns = [0.0] * (b * t)
    for i in range(b):
        cumulative = 0.0
        for k in reversed(range(t)):
            cumulative = mask[i * t + k] * reward[i * t + k] + 1.0 * cumulative
            returns[i * t + k] = cumulative
    out = openrlhf_normalize(returns, mask)
    B, T = saved
    return out


def verl_reinforce_pp_baseline(token_level_rewards, mask, index, b, t):
    # compute_reinforce_plus_plus_baseline_outcome_advantage: scores = sum(-1); minus the id mean (0 for a
    # singleton); tile * mask; masked_whiten(...) * mask
    scores = [sum(token_level_rewards[i * t:(i + 1) * t]) for i in range(b)]
    groups = {}
    for i in range(b):
        groups.setdefault(index[i], []).append(scores[i])
    means = {k: (0.0 if len(v) == 1 else sum(v) / len(v)) for k, v in groups.items()}
    scores = [scores[i] - means[index[i]] for i in range(b)]
    tiled = [scores[i] * mask[i * t + k] for i in range(b) for k in range(t)]
    return [w * m for w, m in zip(verl_masked_whiten(tiled, mask), mask)]


# ---- forward-mode dual numbers: exact derivatives of a formula written with plain floats ------------------
class Dual:
    """v + d·ε with ε² = 0: running a formula on Duals seeded d = 1 at one input gives its exact partial."""

    def __init__(self, v, d=0.0):
        self.v, self.d = float(v), float(d)

    @staticmethod
    def of(x):
        return x if isinstance(x, Dual) else Dual(x)

    def __add__(self, o):
        o = Dual.of(o)
        return Dual(self.v + o.v, self.d + o.d)

    __radd__ = __add__

    def __sub__(self, o):
        o = Dual.of(o)
        return Dual(self.v - o.v, self.d - o.d)

    def __rsub__(self, o):
        return Dual.of(o) - self

    def __mul__(self, o):
        o = Dual.of(o)
        return Dual(self.v * o.v, self.d * o.v + self.v * o.d)

    __rmul__ = __mul__

    def __truediv__(self, o):
        o = Dual.of(o)
        return Dual(self.v / o.v, (self.d * o.v - self.v * o.d) / (o.v * o.v))

    def __rtruediv__(self, o):
        return Dual.of(o) / self

    def __neg__(self):
        return Dual(-self.v, -self.d)


def d_exp(x):
    e = math.exp(x.v)
    return Dual(e, e * x.d)


def d_clamp(x, lo, hi):
    # torch.clamp: the value clamped, the gradient passed where lo <= x <= hi
    if x.v < lo:
        return Dual(lo)
    if x.v > hi:
        return Dual(hi)
    return x


def d_min(a, b):
    # torch.min(a, b) elementwise (the fixtures have no ties with a non-zero derivative)
    return a if a.v <= b.v else b


def d_sigmoid(x):
    s = 1.0 / (1.0 + math.exp(-x.v))
    return Dual(s, s * (1.0 - s) * x.d)


def grad_of(f, x):
    """[df/dx_j] of a scalar formula f(list of Duals) -> Dual, exactly, one forward pass per input."""
    out = []
    for j in range(len(x)):
        out.append(f([Dual(v, 1.0 if k == j else 0.0) for k, v in enumerate(x)]).d)
    return out


# ---- OpenRLHF loss.py PolicyLoss.forward, policy_loss_type="gspo" (3c3be62) -----------------------------
def openrlhf_gspo(log_probs, old_log_probs, advantages, mask, clip_eps_low, clip_eps_high):
    # log_ratio = log_probs - old_log_probs (no vLLM IS correction)
    log_ratio = [a - b for a, b in zip(log_probs, old_log_probs)]
    ratio = []
    for b in range(B):
        mr = mask[b * T:(b + 1) * T]
        s = sum((log_ratio[b * T + t] * mr[t] for t in range(T)), Dual(0.0))
        s = s / max(sum(mr), 1)  # action_mask.sum(-1).clamp(min=1)
        s = d_exp(s)
        ratio += [s * mr[t] for t in range(T)]  # ratio.exp().unsqueeze(-1) * action_mask
    loss = []
    for r, A in zip(ratio, advantages):
        surr1 = r * A
        surr2 = d_clamp(r, 1 - clip_eps_low, 1 + clip_eps_high) * A
        loss.append(-d_min(surr1, surr2))  # dual_clip None
    # aggregate_loss(token_level_loss=False) (GSPO forces it): per-sequence token means over count + 1e-8,
    # then masked_mean over sequences with a token
    seq_loss, seq_mask = [], []
    for b in range(B):
        mr = mask[b * T:(b + 1) * T]
        n = sum(mr)
        seq_loss.append(sum((loss[b * T + t] * mr[t] for t in range(T)), Dual(0.0)) / (n + 1e-8))
        seq_mask.append(1.0 if n > 0 else 0.0)
    return sum((s * k for s, k in zip(seq_loss, seq_mask)), Dual(0.0)) / sum(seq_mask)


# ---- OpenRLHF loss.py PolicyLoss.forward, policy_loss_type="ppo" with vllm_is_correction_type="seq-mask-tis" ---
def openrlhf_ppo_seq_mask_tis(log_probs, old_log_probs, rollout_log_probs, advantages, mask, clip_eps, low, high):
    raw_policy_log_ratio = [a - b for a, b in zip(log_probs, old_log_probs)]
    ratio = [d_exp(d_clamp(x, -20.0, 20.0)) for x in raw_policy_log_ratio]
    loss = []
    for r, A in zip(ratio, advantages):
        surr1 = r * A
        surr2 = d_clamp(r, 1 - clip_eps, 1 + clip_eps) * A
        loss.append(-d_min(surr1, surr2))
    rollout_log_ratio = [a - b for a, b in zip(old_log_probs, rollout_log_probs)]
    for b in range(B):
        mr = mask[b * T:(b + 1) * T]
        rr = rollout_log_ratio[b * T:(b + 1) * T]
        seq_log_ratio = sum(x * m for x, m in zip(rr, mr)) / sum(mr)  # masked_mean(..., dim=-1), no guard
        seq_is = math.exp(seq_log_ratio)
        seq_mask = 1.0 if (seq_is >= low and seq_is <= high) else 0.0
        for t in range(T):
            vllm_is = math.exp(rr[t])  # detached, not clamped
            loss[b * T + t] = seq_mask * vllm_is * loss[b * T + t]
    # aggregate_loss(token_level_loss=True, batch_num_tokens=None): masked_mean(loss, action_mask)
    return sum((l * m for l, m in zip(loss, mask)), Dual(0.0)) / sum(mask)


# ---- OpenRLHF loss.py VanillaKTOLoss.forward (0489850) --------------------------------------------------
def openrlhf_vanilla_kto(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    def clamp_min0(x):  # .clamp(min=0): gradient passed where x >= 0
        return x if x.v >= 0 else Dual(0.0)

    chosen_logratios = [p - r for p, r in zip(policy_chosen, ref_chosen)]
    rejected_logratios = [p - r for p, r in zip(policy_rejected, ref_rejected)]
    chosen_KL = clamp_min0(sum(chosen_logratios, Dual(0.0)) / len(chosen_logratios))  # .mean().clamp(min=0)
    rejected_KL = clamp_min0(sum(rejected_logratios, Dual(0.0)) / len(rejected_logratios))
    losses = ([1 - d_sigmoid(beta * (c - rejected_KL)) for c in chosen_logratios] +
              [1 - d_sigmoid(beta * (chosen_KL - r)) for r in rejected_logratios])
    return sum(losses, Dual(0.0)) / len(losses)  # torch.cat(...).mean()


# ---- TRL grpo_trainer.py GRPOTrainer._compute_loss, loss_type="grpo", token-level IS, beta = 0 (f2cd577) -------
def trl_grpo_loss(per_token_logps, old_per_token_logps, advantages, mask, epsilon_low, epsilon_high):
    per_token_loss = []
    for b in range(B):
        A = advantages[b]  # advantages.unsqueeze(1)
        for t in range(T):
            coef_1 = d_exp(per_token_logps[b * T + t] - old_per_token_logps[b * T + t])
            coef_2 = d_clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
            per_token_loss.append(-d_min(coef_1 * A, coef_2 * A))
    # ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(): every row counted
    rows_ = []
    for b in range(B):
        mr = mask[b * T:(b + 1) * T]
        rows_.append(sum((per_token_loss[b * T + t] * mr[t] for t in range(T)), Dual(0.0)) / max(sum(mr), 1.0))
    return sum(rows_, Dual(0.0)) / B


# ---- verl core_algos.compute_value_loss (+ agg_loss) and dp_critic vpred_mean (b178a3c) ------------------------
def verl_value_loss(vpreds, returns, values, mask, cliprange_value, mode):
    def d_max(a, b):
        return a if a.v >= b.v else b

    loss_mat, gt = [], []
    for v, R, old in zip(vpreds, returns, values):
        vpredclipped = d_max(d_min(v, Dual(old + cliprange_value)), Dual(old - cliprange_value))  # clip_by_value
        vf_losses1 = (v - R) * (v - R)
        vf_losses2 = (vpredclipped - R) * (vpredclipped - R)
        loss_mat.append(d_max(vf_losses1, vf_losses2))  # torch.max (no ties in the fixture)
        gt.append(1.0 if vf_losses2.v > vf_losses1.v else 0.0)
    if mode == "token-mean":
        vf_loss = 0.5 * (sum((l * m for l, m in zip(loss_mat, mask)), Dual(0.0)) / sum(mask))
    else:  # seq-mean-token-mean
        seq = []
        for b in range(B):
            mr = mask[b * T:(b + 1) * T]
            seq.append((sum((loss_mat[b * T + t] * mr[t] for t in range(T)), Dual(0.0)) / (sum(mr) + 1e-8),
                        1.0 if sum(mr) > 0 else 0.0))
        vf_loss = 0.5 * (sum((x * k for x, k in seq), Dual(0.0)) / sum(k for _, k in seq))
    vf_clipfrac = verl_masked_mean(gt, mask)
    vpred_mean = verl_masked_mean([v.v for v in vpreds], mask)
    return vf_loss, vf_clipfrac, vpred_mean


# ---- TRL dpo_trainer.py DPOTrainer._compute_loss, use_weighting (WPO eq. 2), loss_type "sigmoid" (f2cd577) ------
def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def trl_wpo_weights(logits, labels, mask, b, t, v):
    """lse1 = logsumexp(x), lse2 = logsumexp(2x), log_denom = lse2 - 2 lse1,
    aligned = (per_token_logps - log_denom) * mask, weights = exp(aligned.sum(1) / mask.sum(1).clamp_min(1))."""
    weights = []
    for i in range(b):
        total, count = 0.0, 0
        for k in range(t):
            row = logits[(i * t + k) * v:(i * t + k + 1) * v]
            lse1 = logsumexp(row)
            lse2 = logsumexp([2.0 * x for x in row])
            log_denom = lse2 - 2.0 * lse1
            m = mask[i * t + k]
            logp = (row[labels[i * t + k]] - lse1) if m else 0.0  # selective_log_softmax, zeroed off the mask
            total += (logp - log_denom) * m
            count += m
        weights.append(math.exp(total / max(count, 1)))
    return weights


def d_neg_logsigmoid(x):
    # -F.logsigmoid(x) = softplus(-x); derivative -sigmoid(-x)
    return Dual(math.log1p(math.exp(-x.v)), -(1.0 / (1.0 + math.exp(x.v))) * x.d)


def trl_dpo_sigmoid_weighted(chosen, rejected, ref_chosen, ref_rejected, w_chosen, w_rejected, beta):
    # per_sequence_loss = -logsigmoid(beta * delta_score); per_sequence_loss *= chosen_weights * rejected_weights;
    # loss += per_sequence_loss.mean()
    losses = []
    for c, r, rc, rr, wc, wr in zip(chosen, rejected, ref_chosen, ref_rejected, w_chosen, w_rejected):
        delta = (c - rc) - (r - rr)
        losses.append(d_neg_logsigmoid(beta * delta) * (wc * wr))
    return sum(losses, Dual(0.0)) / len(losses)


# ---- TRL grpo_trainer.py _generate_and_score_completions (f2cd577); trl/trainer/utils.py nanstd (unbiased) ------
def trl_nanstd(xs):
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / len(xs)
    return math.sqrt(var * len(xs) / (len(xs) - 1))


def trl_normalize_then_sum(rewards_per_func, weights, num_generations):
    """grouped = view(-1, G, K); reward_k = (grouped - mean_k) / (std_k + 1e-4); rewards = (reward_k * w).nansum(1);
    std_rewards = nanstd(rewards); advantages = (rewards - nanmean(rewards)) / (std_rewards + 1e-4)."""
    n, k_count = len(rewards_per_func), len(weights)
    reward_k = [[0.0] * k_count for _ in range(n)]
    for g0 in range(0, n, num_generations):
        for k in range(k_count):
            col = [rewards_per_func[i][k] for i in range(g0, g0 + num_generations)]
            mean_k = sum(col) / len(col)
            std_k = trl_nanstd(col)
            for i in range(g0, g0 + num_generations):
                reward_k[i][k] = (rewards_per_func[i][k] - mean_k) / (std_k + 1e-4)
    rewards = [sum(reward_k[i][k] * weights[k] for k in range(k_count)) for i in range(n)]
    std_rewards = trl_nanstd(rewards)
    mean = sum(rewards) / n
    adv = [(r - mean) / (std_rewards + 1e-4) for r in rewards]
    frac_zero = 1.0 if abs(std_rewards) <= 1e-8 else 0.0  # torch.isclose(std, 0): atol 1e-8
    return adv, frac_zero


def trl_sum_then_normalize_batch(rewards, num_generations):
    """scale_rewards="batch": advantages = (r - group mean) / (nanstd(rewards) + 1e-4);
    is_std_zero = isclose(std_rewards, 0) with std_rewards the batch std expanded to every row."""
    n = len(rewards)
    std_rewards = trl_nanstd(rewards)
    adv = []
    for g0 in range(0, n, num_generations):
        group = rewards[g0:g0 + num_generations]
        mean = sum(group) / len(group)
        adv += [(r - mean) / (std_rewards + 1e-4) for r in group]
    frac_zero = 1.0 if abs(std_rewards) <= 1e-8 else 0.0
    return adv, frac_zero


# ---- Whole steps: advantages -> policy loss -> metrics, each framework's order ---------------------------------
def d_max2(a, b):
    # torch.max(a, b) elementwise (the fixtures have no ties with different derivatives)
    return a if a.v >= b.v else b


def trl_grpo_dapo_step(lp, old, ref, adv, mask, b, t, eps_low, eps_high, beta):
    """TRL GRPOTrainer._compute_loss (f2cd577), loss_type "dapo" (the default), token-level IS, beta != 0:
    coef_1 = exp(lp - old); coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high);
    per_token_loss = -min(coef_1 A, coef_2 A) + beta (exp(ref - lp) - (ref - lp) - 1);
    loss = (per_token_loss * mask).sum() / num_items_in_batch (one process: mask.sum()).
    Returns the loss (Dual) and the logged metrics (floats)."""
    total, kl_sum, low, high, region = Dual(0.0), 0.0, 0.0, 0.0, 0.0
    row_low, row_high = [], []
    for i in range(b):
        rl, rh, n = 0.0, 0.0, 0.0
        for k in range(t):
            j = i * t + k
            A, m = adv[i], mask[j]
            coef_1 = d_exp(lp[j] - old[j])
            coef_2 = d_clamp(coef_1, 1 - eps_low, 1 + eps_high)
            per_token = -d_min(coef_1 * A, coef_2 * A)
            d = ref[j] - lp[j]
            kl = d_exp(d) - d - 1.0
            total = total + (per_token + beta * kl) * m
            kl_sum += kl.v * m
            is_low = 1.0 if (coef_1.v < 1 - eps_low and A < 0) else 0.0
            is_high = 1.0 if (coef_1.v > 1 + eps_high and A > 0) else 0.0
            low += is_low * m
            high += is_high * m
            region += max(is_low, is_high) * m
            rl += is_low * m
            rh += is_high * m
            n += m
        if n > 0:  # masked_seq_mean is NaN for an empty row; nanmin / nanmax skip it
            row_low.append(rl / n)
            row_high.append(rh / n)
    n = sum(mask)
    metrics = {"kl": kl_sum / n, "clip_ratio_low": low / n, "clip_ratio_high": high / n,
               "clip_ratio_region": region / n, "clip_ratio_low_min": min(row_low),
               "clip_ratio_high_max": max(row_high)}
    return total / max(n, 1.0), metrics


def verl_pg_loss_dual(log_prob, old_log_prob, advantages, mask, clip_low, clip_high, clip_c):
    """compute_policy_loss_vanilla's pg_losses on Duals, agg_loss token-mean (as verl_policy_loss above)."""
    losses = []
    for lp, o, A in zip(log_prob, old_log_prob, advantages):
        ratio = d_exp(d_clamp(lp - o, -20.0, 20.0))
        pg1 = -(ratio * A)
        pg2 = -(d_clamp(ratio, 1 - clip_low, 1 + clip_high) * A)
        cpg1 = d_max2(pg1, pg2)
        cpg2 = d_min(Dual(-A * clip_c), cpg1)
        losses.append(cpg2 if A < 0 else cpg1)
    return sum((l * m for l, m in zip(losses, mask)), Dual(0.0)) / sum(mask)


def openrlhf_ppo_policy_loss(log_probs, old_log_probs, advantages, mask, clip_eps):
    """OpenRLHF loss.py PolicyLoss.forward (3c3be62), policy_loss_type "ppo", token_level_loss, no dual clip, no IS:
    ratio = exp(clamp(log_probs - old, -20, 20)); loss = -min(surr1, surr2); masked_mean over every token;
    clip_ratio = masked_mean(surr2 < surr1); ppo_kl = masked_mean(-(log_probs - old))."""
    loss, clipped = Dual(0.0), 0.0
    for lp, o, A, m in zip(log_probs, old_log_probs, advantages, mask):
        ratio = d_exp(d_clamp(lp - o, -20.0, 20.0))
        surr1 = ratio * A
        surr2 = d_clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A
        loss = loss + (-d_min(surr1, surr2)) * m
        clipped += (1.0 if surr2.v < surr1.v else 0.0) * m
    n = sum(mask)
    ppo_kl = sum(-(Dual.of(lp).v - o) * m for lp, o, m in zip(log_probs, old_log_probs, mask)) / n
    return loss / n, clipped / n, ppo_kl


def emit_vec(name, v):
    print(f"inline const std::vector<double> {name} = {{{', '.join(repr(float(x)) for x in v)}}};")


def emit(name, x):
    print(f"inline constexpr double {name} = {float(x)!r};")


def main():
    print("// Generated by tests/reference/make_golden_conventions.py (plain Python floats); do not edit.")
    print("// clang-format off")
    print("// verl b178a3c and OpenRLHF 3c3be62 formulas re-typed in float64; see the script for each source.")
    print("#pragma once")
    print("#include <vector>")
    print("namespace posttrain::golden_conventions {")
    print(f"inline constexpr long B = {B}, T = {T};")
    emit_vec("x", X)
    emit_vec("mask", M)
    emit_vec("x_const", XC)
    emit_vec("mask_const", MC)

    # 1. masked statistics
    emit("verl_masked_mean", verl_masked_mean(X, M))
    emit_vec("verl_masked_mean_rows", [verl_masked_sum(xr, mr) / (sum(mr) + 1e-8)
                                       for xr, mr in zip(rows(X), rows(M))])
    emit("verl_masked_var", verl_masked_var(X, M))
    emit("verl_masked_var_biased", verl_masked_var(X, M, unbiased=False))
    emit_vec("verl_masked_whiten", verl_masked_whiten(X, M))
    emit_vec("openrlhf_whiten", openrlhf_normalize(X, M))
    emit_vec("openrlhf_centre", openrlhf_normalize(X, M, std_norm=False))
    emit_vec("openrlhf_whiten_floor", openrlhf_normalize(XC, MC))

    # 2. sequence aggregation
    L = [0.3, -1.2, 0.8, 9.0, 9.0,
         2.5, 9.0, -0.7, 1.6, 0.4,
         9.0, 9.0, 9.0, 9.0, 9.0]
    emit_vec("loss", L)
    emit("verl_seq_mean_token_mean", verl_seq_mean_token_mean(L, M))
    emit("verl_seq_mean_token_mean_global", verl_seq_mean_token_mean(L, M, global_batch_size=4.0))
    emit_vec("verl_seq_mean_token_mean_grad", verl_seq_mean_token_mean_grad(M))
    emit("openrlhf_sample_level", openrlhf_sample_level(L, M))

    # 3. GAE (mask with an observation token inside row 1, trailing padding, an empty row)
    R = [0.1, -0.2, 0.0, 0.0, 0.0,
         0.05, 0.3, 0.0, -0.1, 1.0,
         0.4, 0.0, 0.0, 0.0, 0.0]
    V = [0.5, 0.2, -0.3, 0.8, 0.1,
         -0.4, 0.9, 0.3, 0.7, -0.2,
         0.6, -0.5, 0.2, 0.0, 0.3]
    R[2] = 1.0  # row 0's score at its last kept token
    emit_vec("rewards", R)
    emit_vec("values", V)
    adv, ret, raw = verl_gae(R, V, M, 0.9, 0.8)
    emit_vec("verl_gae_advantages", adv)
    emit_vec("verl_gae_returns", ret)
    emit_vec("verl_gae_raw", raw)

    # 4. PPO metrics (one token past the dual-clip bound with A < 0)
    # row 1, t = 2: a log-ratio of 25, past verl's clamp at 20 (A < 0, so dual-clip caps its loss)
    LP = [-1.0, -0.5, -2.0, -1.0, -1.0,
          -0.3, -1.0, 23.8, -0.2, -0.9,
          -1.0, -1.0, -1.0, -1.0, -1.0]
    OLD = [-1.1, -0.2, -3.3, -1.0, -1.0,
           -0.35, -1.0, -1.2, -0.5, -0.8,
           -1.0, -1.0, -1.0, -1.0, -1.0]
    A = [0.8, -0.6, -1.2, 0.0, 0.0,
         1.5, 0.0, -0.4, 0.9, -1.1,
         0.0, 0.0, 0.0, 0.0, 0.0]
    emit_vec("logprobs", LP)
    emit_vec("old_logprobs", OLD)
    emit_vec("advantages", A)
    for mode, tag in (("token-mean", "token_mean"), ("seq-mean-token-mean", "seq_mean_token_mean")):
        loss, cf, lower, kl = verl_policy_loss(LP, OLD, A, M, 0.2, 0.28, 3.0, mode)
        emit(f"verl_pg_loss_{tag}", loss)
        if tag == "token_mean":
            emit("verl_pg_clipfrac", cf)
            emit("verl_pg_clipfrac_lower", lower)
            emit("verl_ppo_kl", kl)

    # 5. OpenRLHF compute_reward with reward_clip_range (padding: log_probs == base, so kl = 0 there)
    scores = [3.5, -0.2, -7.0]
    REF = [-1.2, -0.1, -2.5, -1.0, -1.0,
           -0.6, -1.0, -1.1, -0.4, -1.3,
           -1.0, -1.0, -1.0, -1.0, -1.0]
    M5 = [1, 1, 1, 0, 0,
          1, 1, 1, 1, 1,
          1, 1, 0, 0, 0]
    emit_vec("scores", scores)
    emit_vec("ref_logprobs", REF)
    emit_vec("mask_reward", M5)
    LP5 = list(LP)
    LP5[7] = -1.5  # inside compute_approx_kl's +-10 clamp (posttrain's k1 has none)
    emit_vec("logprobs_reward", LP5)
    emit_vec("openrlhf_reward_clipped", openrlhf_reward(scores, 0.05, LP5, REF, M5, (-2.0, 2.0)))

    # 6. REINFORCE++-baseline: OpenRLHF centres the raw scores before the KL penalty; verl sums first
    B6, T6 = 4, 4
    print(f"inline constexpr long B6 = {B6}, T6 = {T6};")
    scores6 = [1.0, 0.0, 0.5, 0.25]
    index6 = [0, 0, 1, 1]
    LP6 = [-0.5, -1.5, -0.25, -2.0,
           -1.0, -0.75, -3.0, -1.0,
           -0.2, -0.9, -1.3, -0.6,
           -2.2, -0.4, -1.0, -1.0]
    REF6 = [-0.75, -1.0, -0.5, -2.0,
            -1.5, -0.5, -2.0, -1.0,
            -0.6, -0.8, -1.0, -0.7,
            -1.7, -0.9, -1.0, -1.0]
    M6 = [1, 1, 1, 0,
          1, 0, 1, 0,
          1, 1, 1, 1,
          1, 1, 0, 0]
    emit_vec("scores6", scores6)
    print(f"inline const std::vector<long> index6 = {{{', '.join(str(i) for i in index6)}}};")
    emit_vec("logprobs6", LP6)
    emit_vec("ref_logprobs6", REF6)
    emit_vec("mask6", M6)
    emit_vec("openrlhf_reinforce_baseline",
             openrlhf_reinforce_baseline(scores6, 2, 0.05, LP6, REF6, M6, B6, T6))
    # verl's token_level_rewards: score at the last kept token, -beta * kl at kept tokens (apply_kl_penalty)
    tlr = []
    for i in range(B6):
        last = max(k for k in range(T6) if M6[i * T6 + k])
        for k in range(T6):
            kl = (LP6[i * T6 + k] - REF6[i * T6 + k]) * M6[i * T6 + k]
            tlr.append(-0.05 * kl + (scores6[i] if k == last else 0.0))
    emit_vec("verl_reinforce_pp_baseline", verl_reinforce_pp_baseline(tlr, M6, index6, B6, T6))

    # 7. OpenRLHF GSPO with per-token advantages: the gradient through the sequence-mean ratio. Row 0 stays inside
    # [0.8, 1.2] (every token unclipped, mixed-sign A); row 1's ratio exp(0.2) > 1.2 clips its A > 0 tokens only.
    GLP = [-0.9, -0.55, -1.08, -2.0, -1.0,
           -0.05, -1.4, -0.95, -0.4, -0.65,
           -1.0, -0.7, -1.3, -0.2, -1.1]
    GOLD = [-1.0, -0.5, -1.2, -1.0, -1.0,
            -0.35, -1.0, -1.2, -0.5, -0.8,
            -1.0, -1.0, -1.0, -1.0, -1.0]
    emit_vec("gspo_logprobs", GLP)
    emit_vec("gspo_old_logprobs", GOLD)
    emit("openrlhf_gspo_loss", openrlhf_gspo([Dual(v) for v in GLP], GOLD, A, M, 0.2, 0.2).v)
    emit_vec("openrlhf_gspo_grad", grad_of(lambda lp: openrlhf_gspo(lp, GOLD, A, M, 0.2, 0.2), GLP))

    # 8. OpenRLHF seq-mask-tis (thresholds [0.5, 5.0]): row 0 kept (geometric ratio exp(1.1/3)) with token ratios
    # e^1.9 > 5 and e^-0.9 < 0.5 left untruncated, row 1 dropped (exp(8.6/5) > 5), row 2 kept
    ILP = [-1.05, -0.25, -1.5, -1.0, -1.0,
           -0.2, -1.1, -1.0, -0.3, -0.95,
           -0.9, -1.1, -1.0, -1.0, -1.0]
    IRO = [o - x for o, x in zip(OLD, [1.9, -0.9, 0.1, 3.0, 3.0,
                                       2.0, 1.5, 1.8, 1.7, 1.6,
                                       -0.2, 0.3, 3.0, 3.0, 3.0])]
    AI = list(A[:10]) + [0.5, -0.7, 0.0, 0.0, 0.0]
    emit_vec("is_logprobs", ILP)
    emit_vec("is_rollout_logprobs", IRO)
    emit_vec("is_advantages", AI)
    f = lambda lp: openrlhf_ppo_seq_mask_tis(lp, OLD, IRO, AI, M5, 0.2, 0.5, 5.0)
    emit("openrlhf_seq_mask_tis_loss", f([Dual(v) for v in ILP]).v)
    emit_vec("openrlhf_seq_mask_tis_grad", grad_of(f, ILP))

    # 9. OpenRLHF VanillaKTOLoss, β = 0.1, three desirable and three undesirable examples interleaved as posttrain
    # takes them (desirable flags); the second fixture's undesirable mean log-ratio is negative, so z_U = 0
    KD = [1, 0, 0, 1, 1, 0]
    KREF = [-12.0, -9.5, -15.0, -8.0, -20.0, -11.0]
    for tag, KLP in (("", [-10.5, -9.0, -16.0, -7.0, -21.0, -9.0]),
                     ("_neg", [-10.5, -11.0, -16.5, -7.0, -21.0, -10.5])):
        chosen = [i for i in range(6) if KD[i]]
        rejected = [i for i in range(6) if not KD[i]]

        def f(lp):
            return openrlhf_vanilla_kto([lp[i] for i in chosen], [lp[i] for i in rejected],
                                        [KREF[i] for i in chosen], [KREF[i] for i in rejected], 0.1)

        emit_vec(f"kto_logps{tag}", KLP)
        emit(f"openrlhf_vanilla_kto_loss{tag}", f([Dual(v) for v in KLP]).v)
        emit_vec(f"openrlhf_vanilla_kto_grad{tag}", grad_of(f, KLP))
    emit_vec("kto_ref_logps", KREF)
    emit_vec("kto_desirable", KD)

    # 10. TRL grpo over a batch whose last row has no completion token (M): TRL's .mean() counts it
    GA = [0.9, -0.6, 1.3]
    emit_vec("grpo_advantages", GA)
    g = lambda lp: trl_grpo_loss(lp, OLD, GA, M, 0.2, 0.2)
    emit("trl_grpo_loss_empty_row", g([Dual(v) for v in GLP]).v)
    emit_vec("trl_grpo_grad_empty_row", grad_of(g, GLP))

    # 11. verl value loss, cliprange_value 0.5 (V - V_old past +-0.5 at three kept tokens)
    VP = [0.9, -0.3, 0.65, 0.0, 0.0,
          1.2, 0.0, -0.1, 0.3, 0.75,
          0.0, 0.0, 0.0, 0.0, 0.0]
    VOLD = [0.2, -0.2, 0.5, 0.0, 0.0,
            0.4, 0.0, 0.6, 0.35, 0.7,
            0.0, 0.0, 0.0, 0.0, 0.0]
    VRET = [1.0, 0.1, 0.2, 0.0, 0.0,
            0.1, 0.0, 0.5, -0.4, 0.9,
            0.0, 0.0, 0.0, 0.0, 0.0]
    emit_vec("vf_vpreds", VP)
    emit_vec("vf_old_values", VOLD)
    emit_vec("vf_returns", VRET)
    for mode, tag in (("token-mean", "token_mean"), ("seq-mean-token-mean", "seq_mean_token_mean")):
        vf = lambda vp: verl_value_loss(vp, VRET, VOLD, M, 0.5, mode)[0]
        loss, clipfrac, vpred_mean = verl_value_loss([Dual(v) for v in VP], VRET, VOLD, M, 0.5, mode)
        emit(f"verl_vf_loss_{tag}", loss.v)
        emit_vec(f"verl_vf_grad_{tag}", grad_of(vf, VP))
        if tag == "token_mean":
            emit("verl_vf_clipfrac", clipfrac)
            emit("verl_vpred_mean", vpred_mean)
    # 12. TRL WPO (use_weighting): weights from the policy's own logits, then the sigmoid DPO loss of each pair times
    # w_chosen * w_rejected. Rows are TRL's concatenated batch [chosen 0, chosen 1, rejected 0, rejected 1] of shifted
    # logits [4, 3, 4]; row 0's most likely labels give a weight above 1 (no clamp in f2cd577); row 3 has one token.
    BW, TW, VW = 4, 3, 4
    print(f"inline constexpr long BW = {BW}, TW = {TW}, VW = {VW};")
    WL = [2.0, 0.0, 0.0, 0.0, 1.5, 1.0, -0.5, 0.0, 0.3, 0.1, 3.0, -1.0,
          0.2, -0.7, 1.1, 0.4, -1.2, 2.2, 0.0, 0.5, 0.9, 0.9, -0.3, 0.1,
          -0.4, 0.6, 0.0, 1.7, 0.8, -2.0, 0.5, 0.25, 1.0, 1.0, 1.0, 1.0,
          3.0, -1.0, 0.5, 0.0, 0.1, 0.2, 0.3, 0.4, -5.0, 2.0, 1.0, 0.0]
    WY = [0, 0, 2, 2, 1, 3, 3, 0, 1, 0, 0, 0]
    WM = [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0]
    emit_vec("wpo_logits", WL)
    print(f"inline const std::vector<long> wpo_labels = {{{', '.join(str(y if m else -100) for y, m in zip(WY, WM))}}};")
    w = trl_wpo_weights(WL, WY, WM, BW, TW, VW)
    emit_vec("trl_wpo_weights", w)
    logps = []
    for i in range(BW):
        lp = 0.0
        for k in range(TW):
            row = WL[(i * TW + k) * VW:(i * TW + k + 1) * VW]
            if WM[i * TW + k]:
                lp += row[WY[i * TW + k]] - logsumexp(row)
        logps.append(lp)
    WREF_C, WREF_R = [-2.5, -3.0], [-4.0, -1.5]
    emit_vec("wpo_ref_chosen", WREF_C)
    emit_vec("wpo_ref_rejected", WREF_R)
    f = lambda cr: trl_dpo_sigmoid_weighted(cr[:2], cr[2:], WREF_C, WREF_R, w[:2], w[2:], 0.1)
    emit("trl_wpo_dpo_loss", f([Dual(v) for v in logps]).v)
    emit_vec("trl_wpo_dpo_grad", grad_of(f, logps))  # [d/d chosen_logps (2), d/d rejected_logps (2)]

    # 13. TRL multi_objective_aggregation="normalize_then_sum": per-reward group normalisation, weighted sum, then
    # once more over the batch; 2 groups of 3 generations, 2 reward functions, weights [1.0, 0.5]; the second
    # reward is constant in group 2 (exactly representable, so TRL's plain mean centres it to exactly 0)
    MR = [[1.0, 0.2], [0.0, 0.9], [0.5, 0.7], [0.5, 0.5], [1.0, 0.5], [0.25, 0.5]]
    emit_vec("multi_rewards", [x for r in MR for x in r])
    adv, frac = trl_normalize_then_sum(MR, [1.0, 0.5], 3)
    emit_vec("trl_normalize_then_sum", adv)
    emit("trl_normalize_then_sum_frac_zero_std", frac)

    # 14. TRL scale_rewards="batch": advantages over the batch std, frac_reward_zero_std from the batch std (0 here,
    # although group 1 has equal rewards: the group std would count it); and an all-equal batch (frac 1)
    SR = [1.0, 0.0, 0.5, 0.5, 0.9, 0.2]
    emit_vec("batch_scores", SR)
    adv, frac = trl_sum_then_normalize_batch(SR, 2)
    emit_vec("trl_batch_advantages", adv)
    emit("trl_batch_frac_zero_std", frac)
    emit("trl_batch_frac_zero_std_equal", trl_sum_then_normalize_batch([0.7] * 6, 2)[1])
    emit("trl_reward_std", trl_nanstd(SR))  # the logged reward_std: nanstd(rewards) over the batch
    # 15. Whole steps. (a) TRL GRPO, f2cd577 defaults but beta = 0.04 and epsilon_high = 0.28: group advantages
    # (num_generations 2, (r - mean) / (std + 1e-4)) -> dapo loss with k3 -> logged metrics; row 3 is empty
    BS, TS = 4, 4
    print(f"inline constexpr long BS = {BS}, TS = {TS};")
    S_SCORES = [1.0, 0.0, 0.25, 0.75]
    S_LP = [-0.9, -1.6, -0.2, -1.1, -0.5, -2.4, -0.7, -1.0, -1.2, -0.4, -0.8, -2.0, -1.0, -1.0, -1.0, -1.0]
    S_OLD = [-1.0, -1.3, -0.5, -1.0, -0.7, -2.0, -0.7, -1.4, -1.0, -0.45, -1.2, -2.0, -1.0, -1.0, -1.0, -1.0]
    S_REF = [-1.2, -1.5, -0.3, -0.9, -0.4, -2.2, -0.6, -1.1, -1.1, -0.5, -1.0, -1.9, -1.0, -1.0, -1.0, -1.0]
    S_M = [1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    for name, v in (("step_scores", S_SCORES), ("step_logprobs", S_LP), ("step_old_logprobs", S_OLD),
                    ("step_ref_logprobs", S_REF), ("step_mask", S_M)):
        emit_vec(name, v)
    adv = []
    for g0 in range(0, BS, 2):
        grp = S_SCORES[g0:g0 + 2]
        mean = sum(grp) / 2
        std = trl_nanstd(grp)
        adv += [(r - mean) / (std + 1e-4) for r in grp]
    emit_vec("trl_step_advantages", adv)
    f = lambda lp: trl_grpo_dapo_step(lp, S_OLD, S_REF, adv, S_M, BS, TS, 0.2, 0.28, 0.04)[0]
    loss, metrics = trl_grpo_dapo_step([Dual(v) for v in S_LP], S_OLD, S_REF, adv, S_M, BS, TS, 0.2, 0.28, 0.04)
    emit("trl_step_loss", loss.v)
    emit_vec("trl_step_grad", grad_of(f, S_LP))
    for k, v in metrics.items():
        emit(f"trl_step_{k}", v)

    # (b) verl PPO: GAE (gamma 0.9, lam 0.8, whitened) -> compute_policy_loss_vanilla (ppo_options::verl(): clip 0.2,
    # dual-clip 3, log-ratio clamp 20, token-mean) and compute_value_loss (cliprange_value 0.5) on GAE's returns
    adv, ret, _ = verl_gae(R, V, M, 0.9, 0.8)
    f = lambda lp: verl_pg_loss_dual(lp, OLD, adv, M, 0.2, 0.2, 3.0)
    loss, cf, lower, kl = verl_policy_loss(LP, OLD, adv, M, 0.2, 0.2, 3.0, "token-mean")
    emit("verl_step_pg_loss", loss)
    emit("verl_step_pg_loss_dual", f([Dual(v) for v in LP]).v)
    emit_vec("verl_step_pg_grad", grad_of(f, LP))
    emit("verl_step_pg_clipfrac", cf)
    emit("verl_step_pg_clipfrac_lower", lower)
    emit("verl_step_ppo_kl", kl)
    vf_loss, vf_clipfrac, vpred_mean = verl_value_loss([Dual(v) for v in VP], ret, V, M, 0.5, "token-mean")
    emit("verl_step_vf_loss", vf_loss.v)
    emit_vec("verl_step_vf_grad", grad_of(lambda vp: verl_value_loss(vp, ret, V, M, 0.5, "token-mean")[0], VP))
    emit("verl_step_vf_clipfrac", vf_clipfrac)
    emit("verl_step_vpred_mean", vpred_mean)

    # (c) OpenRLHF: reinforce_baseline advantages (fixture 6: KL coef 0.05, 2 samples per prompt, normalised) ->
    # PolicyLoss "ppo" (clip 0.2, clamp 20, token level) with the updated policy's log-probs
    adv6 = openrlhf_reinforce_baseline(scores6, 2, 0.05, LP6, REF6, M6, B6, T6)
    LPN = [v + d for v, d in zip(LP6, [0.3, -0.25, 0.05, 0.0, -0.1, 0.4, 0.0, 0.0,
                                       0.15, -0.3, 0.02, -0.2, 0.25, 0.1, 0.0, 0.0])]
    emit_vec("openrlhf_step_logprobs", LPN)
    f = lambda lp: openrlhf_ppo_policy_loss(lp, LP6, adv6, M6, 0.2)[0]
    loss, clip_ratio, ppo_kl = openrlhf_ppo_policy_loss([Dual(v) for v in LPN], LP6, adv6, M6, 0.2)
    emit("openrlhf_step_loss", loss.v)
    emit_vec("openrlhf_step_grad", grad_of(f, LPN))
    emit("openrlhf_step_clip_ratio", clip_ratio)
    emit("openrlhf_step_ppo_kl", ppo_kl)
    print("}  // namespace posttrain::golden_conventions")


if __name__ == "__main__":
    sys.exit(main())
