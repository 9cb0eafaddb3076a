#!/usr/bin/env python3
"""Writes the torch-made posttrain-verify fixtures: tests/fixtures/verify/torch/*.{safetensors,pt} and
tools/verify_torch_tests.cmake (the ctest cases, generated with them).

Needs PyTorch (Debian: python3-torch; run it with /usr/bin/python3). Where make_verify_fixtures.py transcribes
the frameworks' formulas into plain float64 Python, this script runs them as the frameworks do: torch ops, in the
dump's dtype, gradients from autograd. Each loss below is re-typed from the framework's code (file and function
above each one), not from posttrain:
  sft        transformers/loss/loss_utils.py  ForCausalLMLoss (logits.float(), labels padded and shifted,
             F.cross_entropy(ignore_index=-100, reduction="mean"))
  dpo        trl/trainer/dpo_trainer.py  DPOTrainer.dpo_loss  (sigmoid, hinge, ipo)
  grpo       trl/trainer/grpo_trainer.py  GRPOTrainer._compute_loss  (loss_type grpo and dapo, k3 KL with beta)
  ppo        verl/trainer/ppo/core_algos.py  compute_policy_loss (vanilla) + agg_loss token-mean,
             verl/utils/torch_functional.py masked_mean
  gae        verl/trainer/ppo/core_algos.py  compute_gae_advantage_return (+ verl_F.masked_whiten)
  kl         verl/trainer/ppo/core_algos.py  kl_penalty low_var_kl; loss = masked token mean (sum / count)
  distill    trl/trainer/gkd_trainer.py  GKDTrainer.generalized_jsd_loss
  reward     trl/trainer/reward_trainer.py  RewardTrainer.compute_loss (margin, center_rewards_coefficient)
  advantages verl/trainer/ppo/core_algos.py  compute_grpo_outcome_advantage
Dtypes: float64 and float32 are computed in their own dtype. bfloat16 and float16 dumps hold inputs in that
dtype; the loss is computed from them upcast to float32 (what transformers' loss and autocast do) and every
output is rounded to the dump's dtype; gradients are those autograd gives the half-precision leaves. So each
dump is what a trainer in that precision writes, and posttrain-verify must PASS it at that dtype's tolerance.
Each dump is written twice: safetensors (by this script's own writer, below) and torch.save (zip format).

Also: deliberately wrong dumps (one element off beyond the dtype's tolerance, a sign flip) in both formats, with
the index posttrain-verify must name computed here by the tool's rule, and malformed torch.save files (truncated,
no data.pkl, legacy format, pickle protocol 4, a stack underflow, a storage larger than its record, a tensor
past its storage, a non-tensor value, a uint8 tensor).

Run from the repository root:  /usr/bin/python3 tests/reference/make_verify_torch_fixtures.py
"""
import io
import json
import os
import pickletools
import struct
import zipfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "verify", "torch")
TESTS = os.path.join(ROOT, "tools", "verify_torch_tests.cmake")

DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
ST_NAME = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}
# tools/posttrain_verify.cpp tolerance_for: (atol, rtol) per dtype
TOL = {"f64": (1e-10, 1e-10), "f32": (1e-5, 1e-5), "bf16": (1e-5, 1e-5 + 2 ** -8), "f16": (1e-5, 1e-5 + 2 ** -11)}


# ---- writers ------------------------------------------------------------------------------------

def safetensors_bytes(tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt",
                                              "writer": "tests/reference/make_verify_torch_fixtures.py"}}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write(name, blob):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(blob)


def torch_save_bytes(tensors, **kw):
    buf = io.BytesIO()
    torch.save({k: v.detach() for k, v in tensors.items()}, buf, **kw)
    return buf.getvalue()


def dump(stem, tensors, pt=True):
    """Writes stem.safetensors and (pt) stem.pt holding the same tensors."""
    write(stem + ".safetensors", safetensors_bytes(tensors))
    if pt:
        write(stem + ".pt", torch_save_bytes(tensors))


# ---- the frameworks' losses, in torch ---------------------------------------------------------------

def sft(x):
    # transformers ForCausalLMLoss: logits = logits.float(); labels = pad(labels, (0, 1), value=-100);
    # shift_labels = labels[..., 1:]; cross_entropy(logits.view(-1, V), shift_labels.view(-1), ignore_index=-100)
    logits = x["logits"].float() if x["logits"].dtype != torch.float64 else x["logits"]
    labels = F.pad(x["labels"], (0, 1), value=-100)[..., 1:]
    B, T, V = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="mean")
    per_token = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                                reduction="none").view(B, T)
    return loss, {"loss": loss, "per_token_loss": per_token}


def dpo(x, loss_type, beta):
    # TRL DPOTrainer.dpo_loss
    logratios = x["chosen_logps"] - x["rejected_logps"]
    ref_logratios = x["ref_chosen_logps"] - x["ref_rejected_logps"]
    logits = logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)  # label_smoothing 0
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (x["chosen_logps"] - x["ref_chosen_logps"]).detach()
    rejected_rewards = beta * (x["rejected_logps"] - x["ref_rejected_logps"]).detach()
    loss = losses.mean()
    return loss, {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                  "loss": loss}


def grpo(x, loss_type, epsilon, epsilon_high, beta):
    # TRL GRPOTrainer._compute_loss
    per_token_logps, mask = x["log_probs"], x["response_mask"].to(x["log_probs"].dtype)
    ref = x["ref_log_prob"]
    per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    advantages = x["advantages"]
    old = x["old_log_probs"]
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:  # dapo, num_items_in_batch = the batch's token count
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    kl = (per_token_kl * mask).sum() / mask.sum()
    return loss, {"loss": loss, "per_token_loss": per_token_loss * mask, "kl": kl}


def verl_masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def ppo_verl(x, clip_ratio=0.2, clip_ratio_c=3.0):
    # verl core_algos.compute_policy_loss (vanilla), agg_loss(loss_agg_mode="token-mean")
    log_prob, old_log_prob, advantages = x["log_probs"], x["old_log_probs"], x["advantages"]
    mask = x["response_mask"].to(log_prob.dtype)
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).to(log_prob.dtype), mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).to(log_prob.dtype), mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_masked_mean(pg_losses, mask)
    return pg_loss, {"pg_loss": pg_loss, "pg_losses": pg_losses * mask, "pg_clipfrac": pg_clipfrac,
                     "ppo_kl": ppo_kl, "pg_clipfrac_lower": pg_clipfrac_lower}


def verl_masked_whiten(values, mask):
    # verl_F.masked_whiten: masked_mean, masked_var (unbiased: * n / (n - 1)), (values - mean) * rsqrt(var + 1e-8)
    mean = verl_masked_mean(values, mask)
    centered = values - mean
    var = verl_masked_mean(centered ** 2, mask)
    n = mask.sum()
    var = var * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def gae_verl(x, gamma, lam):
    # verl core_algos.compute_gae_advantage_return
    token_level_rewards, values = x["token_level_rewards"], x["values"]
    response_mask = x["response_mask"].to(values.dtype)
    with torch.no_grad():
        nextvalues = torch.zeros_like(values[:, 0])
        lastgaelam = torch.zeros_like(values[:, 0])
        advantages_reversed = []
        for t in reversed(range(token_level_rewards.shape[-1])):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam_)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        advantages = verl_masked_whiten(advantages, response_mask)
    return None, {"advantages": advantages, "returns": returns}


def kl_low_var(x):
    # verl core_algos.kl_penalty("low_var_kl"); loss: sum(kl * mask) / sum(mask) (posttrain-verify --loss kl)
    logprob, ref_logprob = x["log_probs"], x["ref_log_prob"]
    mask = x["response_mask"].to(logprob.dtype)
    kl = ref_logprob - logprob
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    kld = torch.clamp(kld, min=-10, max=10)
    loss = (kld * mask).sum() / mask.sum()
    return loss, {"kl": kld, "loss": loss}


def gkd(x, beta, temperature):
    # TRL GKDTrainer.generalized_jsd_loss (reduction "batchmean", labels given)
    student_logits = x["student_logits"] / temperature
    teacher_logits = x["teacher_logits"] / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    mask = x["labels"] != -100
    jsd = jsd[mask]
    loss = jsd.sum() / mask.sum()
    return loss, {"loss": loss}


def reward(x, center_rewards_coefficient):
    # TRL RewardTrainer.compute_loss
    rc, rr = x["rewards_chosen"], x["rewards_rejected"]
    loss = -F.logsigmoid(rc - rr - x["margin"]).mean()
    loss = loss + center_rewards_coefficient * torch.mean((rc + rr) ** 2)
    return loss, {"loss": loss}


def grpo_outcome_verl(x, epsilon=1e-6):
    # verl core_algos.compute_grpo_outcome_advantage (norm_adv_by_std_in_grpo=True)
    scores, index = x["scores"].clone(), x["uid"].tolist()
    with torch.no_grad():
        id2score = {}
        for i, u in enumerate(index):
            id2score.setdefault(u, []).append(scores[i])
        id2mean, id2std = {}, {}
        for u, s in id2score.items():
            if len(s) == 1:
                id2mean[u], id2std[u] = torch.tensor(0.0, dtype=scores.dtype), torch.tensor(1.0, dtype=scores.dtype)
            else:
                stacked = torch.stack(s)
                id2mean[u], id2std[u] = torch.mean(stacked), torch.std(stacked)
        for i, u in enumerate(index):
            scores[i] = (scores[i] - id2mean[u]) / (id2std[u] + epsilon)
        advantages = scores.unsqueeze(-1) * x["response_mask"].to(scores.dtype)
    return None, {"advantages": advantages}


def run(fn, inputs, dtype, grads=(), **kw):
    """Runs `fn` as a trainer in `dtype` does; returns the dump: the rounded inputs, the outputs, the gradients."""
    stored = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    leaves = {k: stored[k].clone().requires_grad_(True) for k in grads}
    compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    x = {k: (leaves.get(k, v).to(compute) if v.is_floating_point() else v) for k, v in stored.items()}
    loss, outs = fn(x, **kw)
    if grads:
        loss.backward()
    out = dict(stored)
    out.update({k: v.detach().to(dtype) for k, v in outs.items()})
    out.update({k + ".grad": leaves[k].grad for k in grads})
    return out


# ---- the fixtures ----------------------------------------------------------------------------------

tests = []  # (name, status, regex, args, torch_only)


def test(name, status, regex, args, torch_only=False):
    tests.append((name, status, regex, list(args), torch_only))


def fx(name):
    return "${fixtures}/torch/" + name


def worst_index(got, ref, tol):
    """The flat index of the largest violation of |got - ref| <= atol + rtol |ref| (the tool's rule)."""
    g, r = got.double().reshape(-1), ref.double().reshape(-1)
    excess = (g - r).abs() - (tol[0] + tol[1] * r.abs())
    i = int(torch.argmax(excess))
    assert excess[i] > 0
    return i


def index_text(flat, shape):
    idx = []
    for d in reversed(shape):
        idx.append(flat % d)
        flat //= d
    return "\\[" + ", ".join(str(v) for v in reversed(idx)) + "\\]"


def main():
    torch.manual_seed(20261202)
    g = torch.Generator().manual_seed(20261202)

    def U(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

    # inputs, in float64; each dtype rounds them
    B, T, V = 2, 4, 5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0], labels[1, 2] = -100, -100
    sft_in = {"logits": U((B, T, V), -3, 3), "labels": labels}
    Bp = 6
    chosen, rejected = U(Bp, -60, -10), U(Bp, -60, -10)
    dpo_in = {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": chosen + U(Bp, -4, 4),
              "ref_rejected_logps": rejected + U(Bp, -4, 4)}
    Bg, Tg = 4, 5
    lengths = [5, 3, 4, 2]
    mask = torch.tensor([[1 if t < lengths[b] else 0 for t in range(Tg)] for b in range(Bg)], dtype=torch.int64)
    lp = U((Bg, Tg), -3, -0.1)
    grpo_in = {"log_probs": lp, "old_log_probs": lp + U((Bg, Tg), -0.4, 0.4), "ref_log_prob": lp + U((Bg, Tg), -0.5, 0.5),
               "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64), "response_mask": mask}
    ppo_in = {"log_probs": lp, "old_log_probs": lp + U((Bg, Tg), -0.5, 0.5), "advantages": U((Bg, Tg), -1.5, 1.5),
              "response_mask": mask}
    ppo_in["old_log_probs"][1, 0] = lp[1, 0] + 1.6  # ratio 0.2 with A < 0: the dual clip bounds it
    ppo_in["advantages"][1, 0] = -1.0
    rew = torch.zeros(Bg, Tg, dtype=torch.float64)
    for b in range(Bg):
        rew[b, lengths[b] - 1] = float(U(1, -1, 2))
    rew -= 0.01 * U((Bg, Tg), 0, 1) * mask
    mt_mask = mask.clone()
    mt_mask[0, 2] = 0  # a tool reply inside the first response
    gae_in = {"token_level_rewards": rew, "values": U((Bg, Tg), -1, 1) * mask, "response_mask": mt_mask}
    kl_in = {"log_probs": lp, "ref_log_prob": lp + U((Bg, Tg), -1.5, 1.5), "response_mask": mask}
    Bd, Td, Vd = 2, 3, 6
    dl = torch.randint(0, Vd, (Bd, Td), generator=g)
    dl[1, 0] = -100
    distill_in = {"student_logits": U((Bd, Td, Vd), -2, 2), "teacher_logits": U((Bd, Td, Vd), -2, 2), "labels": dl}
    reward_in = {"rewards_chosen": U(5, -2, 2), "rewards_rejected": U(5, -2, 2), "margin": U(5, 0, 1)}
    adv_in = {"scores": U(6, -1, 2), "uid": torch.tensor([7, 3, 7, 11, 3, 7]),
              "response_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0],
                                             [1, 0, 0, 0]])}

    # (stem, fn, inputs, grads, kwargs, tool arguments, outputs compared)
    cases = [
        ("sft", sft, sft_in, ["logits"], {}, ["--loss", "sft"], 3),
        ("dpo_sigmoid", dpo, dpo_in, ["chosen_logps", "rejected_logps"], dict(loss_type="sigmoid", beta=0.1),
         ["--loss", "dpo", "--set", "loss_type=sigmoid,beta=0.1"], 6),
        ("dpo_hinge", dpo, dpo_in, ["chosen_logps", "rejected_logps"], dict(loss_type="hinge", beta=0.1),
         ["--loss", "dpo", "--set", "loss_type=hinge,beta=0.1"], 6),
        ("dpo_ipo", dpo, dpo_in, ["chosen_logps", "rejected_logps"], dict(loss_type="ipo", beta=0.5),
         ["--loss", "dpo", "--set", "loss_type=ipo,beta=0.5"], 6),
        ("grpo_grpo", grpo, grpo_in, ["log_probs"], dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2, beta=0.04),
         ["--loss", "grpo", "--set", "loss_type=grpo,epsilon=0.2,beta=0.04"], 4),
        ("grpo_dapo", grpo, grpo_in, ["log_probs"], dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04),
         ["--loss", "grpo", "--set", "loss_type=dapo,epsilon=0.2,epsilon_high=0.28,beta=0.04"], 4),
        ("ppo_verl", ppo_verl, ppo_in, ["log_probs"], {},
         ["--loss", "ppo", "--preset", "verl", "--set", "clip_ratio=0.2,loss_agg_mode=token-mean"], 6),
        ("gae_verl", gae_verl, gae_in, [], dict(gamma=0.99, lam=0.95),
         ["--loss", "gae", "--preset", "verl", "--set", "gamma=0.99,lam=0.95"], 2),
        ("kl_low_var_kl", kl_low_var, kl_in, ["log_probs"], {}, ["--loss", "kl", "--set", "kl_penalty=low_var_kl"], 3),
        ("distill_jsd", gkd, distill_in, ["student_logits"], dict(beta=0.5, temperature=0.9),
         ["--loss", "distill", "--set", "beta=0.5,temperature=0.9"], 2),
        ("reward", reward, reward_in, ["rewards_chosen", "rewards_rejected"], dict(center_rewards_coefficient=0.01),
         ["--loss", "reward", "--set", "center_rewards_coefficient=0.01"], 3),
        ("adv_verl_grpo", grpo_outcome_verl, adv_in, [], {}, ["--loss", "advantages", "--preset", "verl"], 1),
    ]
    # the grads' names in the dumps follow the tool's (verl) names: log_probs.grad etc.
    # Every case in every dtype as safetensors; as torch.save, each case in one dtype (float64, float32, bfloat16,
    # float16 in turn: each dtype three times), because a .pt check loads LibTorch (about a second of CPU per run).
    dumps = {}
    tags = list(DTYPES)
    for c, (stem, fn, ins, grads, kw, args, n) in enumerate(cases):
        for tag, dtype in DTYPES.items():
            d = run(fn, ins, dtype, grads, **kw)
            dumps[(stem, tag)] = d
            name = "%s_%s" % (stem, tag)
            pt = tag == tags[c % len(tags)]
            dump(name, d, pt)
            dt = ST_NAME[dtype]
            regex = " %s .*result: PASS \\(%d compared" % (dt, n)
            test("torch %s %s (safetensors)" % (stem, tag), 0, "\\(safetensors\\).*" + regex,
                 [fx(name + ".safetensors")] + args)
            if pt:
                test("torch %s %s (torch.save)" % (stem, tag), 0, "\\(torch.save\\).*" + regex,
                     [fx(name + ".pt")] + args, torch_only=True)

    # wrong dumps: DPO losses[3] off by 4x the dtype's rtol (every dtype, both formats); GRPO's gradient with the
    # sign of one element flipped (float64 and bfloat16, both formats)
    dpo_args = ["--loss", "dpo", "--set", "loss_type=sigmoid,beta=0.1"]
    for tag, dtype in DTYPES.items():
        good = dumps[("dpo_sigmoid", tag)]
        bad = dict(good, losses=good["losses"].clone())
        bad["losses"][3] = (bad["losses"][3].double() * (1 + 4 * TOL[tag][1]) + 4 * TOL[tag][0]).to(dtype)
        i = worst_index(bad["losses"], good["losses"], TOL[tag])
        assert i == 3
        pt = tag in ("f64", "bf16")
        dump("dpo_wrong_element_%s" % tag, bad, pt)
        for ext, torch_only in (("safetensors", False), ("pt", True))[:2 if pt else 1]:
            test("torch dpo one loss element off %s (%s)" % (tag, ext), 1,
                 "losses .*FAIL +1 element\\(s\\) out of tolerance; worst at \\[3\\]",
                 [fx("dpo_wrong_element_%s.%s" % (tag, ext))] + dpo_args, torch_only)
    grpo_args = ["--loss", "grpo", "--set", "loss_type=dapo,epsilon=0.2,epsilon_high=0.28,beta=0.04"]
    for tag in ("f64", "bf16"):
        good = dumps[("grpo_dapo", tag)]
        bad = dict(good, **{"log_probs.grad": good["log_probs.grad"].clone()})
        bad["log_probs.grad"][2, 1] = -bad["log_probs.grad"][2, 1]
        i = worst_index(bad["log_probs.grad"], good["log_probs.grad"], TOL[tag])
        pt = tag == "f64"
        dump("grpo_sign_flip_%s" % tag, bad, pt)
        for ext, torch_only in (("safetensors", False), ("pt", True))[:2 if pt else 1]:
            test("torch grpo sign flip of one gradient element %s (%s)" % (tag, ext), 1,
                 "log_probs.grad .*FAIL +1 element\\(s\\) .*worst at %s" % index_text(i, [Bg, Tg]),
                 [fx("grpo_sign_flip_%s.%s" % (tag, ext))] + grpo_args, torch_only)

    # reward model: one element of a gradient off by 1e-9 (float64, both formats)
    good = dumps[("reward", "f64")]
    bad = dict(good, **{"rewards_rejected.grad": good["rewards_rejected.grad"].clone()})
    bad["rewards_rejected.grad"][2] += 1e-9
    assert worst_index(bad["rewards_rejected.grad"], good["rewards_rejected.grad"], TOL["f64"]) == 2
    dump("reward_wrong_element_f64", bad)
    for ext, torch_only in (("safetensors", False), ("pt", True)):
        test("torch reward model one gradient element off f64 (%s)" % ext, 1,
             "rewards_rejected.grad .*FAIL +1 element\\(s\\) out of tolerance; worst at \\[2\\]",
             [fx("reward_wrong_element_f64.%s" % ext), "--loss", "reward", "--set", "center_rewards_coefficient=0.01"],
             torch_only)

    # malformed torch.save files --------------------------------------------------------------------
    good = dumps[("dpo_sigmoid", "f64")]
    good_pt = torch_save_bytes(good)

    def rezip(blob, change):
        """The archive `blob` with change(name, data) -> data (None drops the record)."""
        src, out = zipfile.ZipFile(io.BytesIO(blob)), io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
            for info in src.infolist():
                data = change(info.filename, src.read(info.filename))
                if data is not None:  # a fixed time stamp: the same bytes on every run
                    z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data)
        return out.getvalue()

    def malformed(name, blob, regex, torch_only=True):
        write(name, blob)
        test("torch malformed: " + name.replace("_", " ").replace(".pt", ""), 2, regex,
             [fx(name), "--loss", "dpo"], torch_only)

    malformed("bad_truncated.pt", good_pt[: len(good_pt) // 2], "torch.save file: .*zip archive")
    malformed("bad_no_pickle.pt", rezip(good_pt, lambda n, d: None if n.endswith("data.pkl") else d),
              "the archive has no data.pkl")
    # (the legacy format keys storages by id(): its bytes differ from run to run, so an existing file is kept)
    legacy = os.path.join(OUT, "bad_legacy.pt")
    malformed("bad_legacy.pt", open(legacy, "rb").read() if os.path.exists(legacy) else
              torch_save_bytes(good, _use_new_zipfile_serialization=False), "a legacy torch.save file", torch_only=False)
    malformed("bad_protocol4.pt", torch_save_bytes(good, pickle_protocol=4),
              "data.pkl: pickle protocol above 2")
    malformed("bad_stack_underflow.pt", rezip(good_pt, lambda n, d: b"\x80\x02\x85." if n.endswith("data.pkl") else d),
              "data.pkl: stack underflow at byte 2")
    malformed("bad_short_record.pt", rezip(good_pt, lambda n, d: d[:16] if n.endswith("data/0") else d),
              "tensor 'chosen_logps': its storage claims 48 bytes but its record holds 16")

    def grow_first_size(n, d):  # the first tensor's size (BININT1 after its storage offset) 6 -> 200
        if not n.endswith("data.pkl"):
            return d
        ops = list(pickletools.genops(d))
        k = next(j for j, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
        op, arg, pos = ops[k + 2]
        assert op.name == "BININT1" and arg == 6
        return d[:pos + 1] + bytes([200]) + d[pos + 2:]

    malformed("bad_past_storage.pt", rezip(good_pt, grow_first_size), "tensor 'chosen_logps' .* reaches past its storage")
    malformed("bad_not_tensor.pt", _save_obj(dict(good, beta=0.1)), "'beta' is a Double, not a tensor")
    malformed("bad_uint8.pt", torch_save_bytes(dict(good, chosen_logps=torch.zeros(6, dtype=torch.uint8))),
              "tensor 'chosen_logps' has dtype Byte")
    malformed("bad_not_dict.pt", _save_obj([good["chosen_logps"], good["rejected_logps"]]),
              "holds a GenericList, not a dict of tensors")
    assert os.path.exists(os.path.join(OUT, "sft_f64.pt"))
    test("torch .pt without LibTorch", 2, "reading .pt dumps needs posttrain-verify built with LibTorch",
         [fx("sft_f64.pt"), "--loss", "sft"], "no_torch")

    with open(TESTS, "w") as f:
        f.write("# Generated by tests/reference/make_verify_torch_fixtures.py: posttrain-verify on the torch-made fixtures\n"
                "# (tests/fixtures/verify/torch/), with the expected exit status and a regular expression its output\n"
                "# must match. The torch.save cases need the tool built with LibTorch. Do not edit by hand.\n")

        def line(t):
            name, status, regex, args, _ = t
            quoted = " ".join('"%s"' % a for a in args)
            return 'posttrain_verify_test("%s" %d "%s" %s)\n' % (name, status,
                                                                 regex.replace("\\", "\\\\").replace('"', '\\"'), quoted)

        for t in tests:
            if t[4] is False:
                f.write(line(t))
        f.write("if(POSTTRAIN_VERIFY_WITH_TORCH)\n")
        for t in tests:
            if t[4] is True:
                f.write("  " + line(t))
        f.write("else()\n")
        for t in tests:
            if t[4] == "no_torch":
                f.write("  " + line(t))
        f.write("endif()\n")
    sizes = sorted(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print("wrote %d fixtures under %s (%d to %d bytes, %d in all) and %d tests to %s" % (
        len(sizes), OUT, sizes[0], sizes[-1], sum(sizes), len(tests), TESTS))


def _save_obj(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


if __name__ == "__main__":
    main()
