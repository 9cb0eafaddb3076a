// Data-parallel global statistics (distributed/global.hpp) on the Eigen backend: R = 1, 2, 3, 4 ranks run as
// threads of this process (support/thread_communicator.hpp), each holding a slice of one batch split again into
// micro-batches of uneven sizes (an empty [0, T] one included), one rank without a kept token (R = 3, 4) and one
// without a row (R = 4); group members spread over ranks. Every global form is held against the single-process
// function on the whole batch: 1e-12 relative in double (the same formulas, summed in another order), float32's
// tolerance in float. Then the communication a GRPO step costs (counted), and every rejection.
#include <catch2/catch.hpp>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/distributed/communicator.hpp"
#include "posttrain/distributed/global.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/thread_communicator.hpp"
#include "support/tolerances.hpp"

namespace test_distributed {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using posttrain::test::run_ranks;

namespace {

constexpr std::int64_t B = 13, W = 6;

template <class S>
constexpr test::tolerance dist_tol() {
  return std::is_same_v<S, double> ? test::conventions_tol : test::float32_tol;
}

/// Rows of each rank (summing to B): rank 1 of R = 3, 4 holds rows 3..5, which keep no token; rank 2 of R = 4
/// holds none.
inline std::vector<std::int64_t> rank_rows(int world) {
  switch (world) {
    case 1: return {B};
    case 2: return {5, 8};
    case 3: return {3, 3, 7};
    default: return {3, 3, 0, 7};
  }
}
inline std::int64_t first_row(int world, int rank) {
  std::int64_t o = 0;
  for (int r = 0; r < rank; ++r) o += rank_rows(world)[static_cast<std::size_t>(r)];
  return o;
}
/// A rank's micro-batches: two of uneven sizes and an empty one ([0, T]); a rank without rows has the empty one.
inline std::vector<std::int64_t> micro_sizes(std::int64_t n) {
  if (n == 0) return {0};
  if (n == 1) return {1, 0};
  return {n - n / 3, n / 3, 0};
}

/// The whole batch (host data, double): masks with rows 3..5 and row 9 empty, group ids spread over ranks.
struct whole_batch {
  test::host_tensor mask, loss, logprobs, old_logprobs, ref_logprobs, entropies, scores, token_rewards;
  test::host_labels group_ids;
  whole_batch() {
    mask = test::random_mask({B, W}, 11, 0.7);
    for (std::int64_t b : {3, 4, 5, 9})
      for (std::int64_t t = 0; t < W; ++t) mask.values[static_cast<std::size_t>(b * W + t)] = 0;
    mask.values[0] = 1;  // row 0 keeps a token whatever the draw
    loss = test::random_normal({B, W}, 12);
    logprobs = test::random_normal({B, W}, 13, 0.3, -1.0);
    old_logprobs = logprobs, ref_logprobs = logprobs;
    const auto d1 = test::random_normal({B, W}, 14, 0.2), d2 = test::random_normal({B, W}, 15, 0.2);
    for (std::size_t k = 0; k < logprobs.values.size(); ++k)
      old_logprobs.values[k] += d1.values[k], ref_logprobs.values[k] += d2.values[k];
    entropies = test::random_normal({B, W}, 16, 0.5, 2.0);
    // scores 0/1/2 with ties; five groups of hashed ids (a group's members sit on several ranks)
    scores = test::random_normal({B}, 17);
    for (auto& v : scores.values) v = std::round(v + 1.0);
    group_ids.shape = {B};
    for (std::int64_t b = 0; b < B; ++b) group_ids.values.push_back(1000003 * ((b * 7) % 5) + 17);
    token_rewards = test::random_normal({B, W}, 18);
  }
};

const whole_batch& data() {
  static const whole_batch d;
  return d;
}

template <class S>
eigen_tensor<S> T_(const test::host_tensor& h) {
  return test::to_eigen<S>(h);
}
template <class S>
eigen_tensor<S> rows_of(const eigen_tensor<S>& x, std::int64_t begin, std::int64_t n) {
  return ops::slice(x, 0, begin, n);
}
inline eigen_index id_rows(std::int64_t begin, std::int64_t n) {
  const auto& v = data().group_ids.values;
  return eigen_index({n}, std::vector<std::int64_t>(v.begin() + begin, v.begin() + begin + n));
}

template <class S>
std::vector<double> host(const eigen_tensor<S>& x) {
  return ops::to_host(x);
}
/// Rank results concatenated in rank order.
inline std::vector<double> joined(const std::vector<std::vector<double>>& parts) {
  std::vector<double> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
template <class S>
void check_all(const std::string& what, const std::vector<double>& got, const eigen_tensor<S>& want) {
  test::check_values(what, eigen_tensor<double>({static_cast<std::int64_t>(got.size())}, got), host(want),
                     dist_tol<S>());
}
inline void check_number(const std::string& what, double got, double want, test::tolerance tol) {
  INFO(what << ": got " << got << ", want " << want);
  CHECK(tol.accepts(got, want));
}

constexpr aggregation all_modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                                     aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                                     aggregation::sum};

}  // namespace

TEMPLATE_TEST_CASE("global_batch: the micro-batch losses of every rank sum to the whole batch's, every mode",
                   "[distributed][global_batch]", double, float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  const T mask = T_<S>(data().mask), loss = T_<S>(data().loss);
  for (int world : {1, 2, 3, 4}) {
    for (auto sync : {gradient_sync::sum, gradient_sync::average}) {
      const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
        const auto sizes = micro_sizes(rank_rows(world)[static_cast<std::size_t>(rank)]);
        std::vector<T> masks, losses;
        std::int64_t at = first_row(world, rank);
        for (auto n : sizes) masks.push_back(rows_of(mask, at, n)), losses.push_back(rows_of(loss, at, n)), at += n;
        const global_batch gb(masks, comm, {.sync = sync});
        std::vector<double> out{gb.tokens(), gb.sequences(), gb.rows(), double(gb.max_length())};
        for (auto mode : all_modes) {
          double total = 0;  // Σ over this rank's (non-empty) micro-batches
          for (std::size_t i = 0; i < masks.size(); ++i)
            if (ops::size(masks[i], 0) > 0)
              total += ops::item(aggregate(losses[i], masks[i], mode, gb.normalizer(mode)));
          out.push_back(total);
        }
        return out;
      });
      double tokens = 0, seqs = 0;
      for (auto v : data().mask.values) tokens += v != 0;
      for (std::int64_t b = 0; b < B; ++b) {
        double n = 0;
        for (std::int64_t t = 0; t < W; ++t) n += data().mask.values[static_cast<std::size_t>(b * W + t)] != 0;
        seqs += n > 0;
      }
      for (const auto& r : per_rank) {  // every rank sees the same global counts
        CHECK(r[0] == tokens);
        CHECK(r[1] == seqs);
        CHECK(r[2] == double(B));
        CHECK(r[3] == double(W));
      }
      std::size_t k = 4;
      for (auto mode : all_modes) {
        double sum = 0;
        for (const auto& r : per_rank) sum += r[k];
        // DDP averages the ranks' gradients: the mean over ranks of each rank's sum is the whole batch's
        if (sync == gradient_sync::average) sum /= world;
        check_number(std::string("world ") + std::to_string(world) + " mode " + aggregation_name(mode) +
                         (sync == gradient_sync::average ? " average" : " sum"),
                     sum, ops::item(aggregate(loss, mask, mode)), dist_tol<S>());
        ++k;
      }
    }
  }
}

TEMPLATE_TEST_CASE(
    "global_batch + grpo_loss: loss, gradient and metrics of a data-parallel step equal the whole "
    "batch's",
    "[distributed][grpo]", double, float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  const auto& d = data();
  const T mask = T_<S>(d.mask), lp = T_<S>(d.logprobs), old = T_<S>(d.old_logprobs), ref = T_<S>(d.ref_logprobs),
          ent = T_<S>(d.entropies), scores = T_<S>(d.scores);
  const eigen_index ids = id_rows(0, B);
  const auto full_adv = grpo_advantages(scores, ids).advantages;
  const auto batch_of = [&](std::int64_t at, std::int64_t n, const T& adv) {
    return grpo_batch<T>{.logprobs = rows_of(lp, at, n),
                         .advantages = adv,
                         .response_mask = rows_of(mask, at, n),
                         .old_logprobs = rows_of(old, at, n),
                         .ref_logprobs = rows_of(ref, at, n),
                         .entropies = rows_of(ent, at, n)};
  };
  for (auto type : {grpo_loss_type::dapo, grpo_loss_type::grpo, grpo_loss_type::dr_grpo, grpo_loss_type::bnpo,
                    grpo_loss_type::luspo}) {
    grpo_options opt{.loss_type = type, .beta = 0.04, .clip = {.clip_low = 0.1, .clip_high = 0.15}};
    const auto full = grpo_loss(batch_of(0, B, full_adv), opt);
    const T full_grad = grpo_loss_backward(batch_of(0, B, full_adv), opt);
    const std::map<std::string, double> full_metrics{{"kl", ops::item(full.kl)},
                                                     {"clip_ratio_low", ops::item(full.clip_ratio_low)},
                                                     {"clip_ratio_high", ops::item(full.clip_ratio_high)},
                                                     {"clip_ratio_region", ops::item(full.clip_ratio_region)},
                                                     {"ratio_mean", ops::item(full.ratio_mean)},
                                                     {"approx_kl", ops::item(full.approx_kl)},
                                                     {"entropy", ops::item(full.entropy)}};
    for (int world : {1, 2, 3, 4}) {
      struct rank_out {
        double loss;
        std::vector<double> grad;
        std::map<std::string, double> metrics;
      };
      const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
        const std::int64_t first = first_row(world, rank), n = rank_rows(world)[static_cast<std::size_t>(rank)];
        // advantages: the group statistics of the whole batch, this rank's rows
        const T adv = global_grpo_advantages(rows_of(scores, first, n), id_rows(first, n), comm).advantages;
        std::vector<T> masks;
        std::int64_t at = first;
        for (auto m : micro_sizes(n)) masks.push_back(rows_of(mask, at, m)), at += m;
        const global_batch gb(masks, comm);
        grpo_options o = opt;
        o.normalizer = gb.normalizer(type);
        rank_out out{0.0, {}, {}};
        global_metrics<T> metrics;
        at = first;
        std::size_t i = 0;
        for (auto m : micro_sizes(n)) {
          if (m > 0) {
            const auto b = batch_of(at, m, rows_of(adv, at - first, m));
            const auto r = grpo_loss(b, o);
            out.loss += ops::item(r.loss);
            const auto g = host(grpo_loss_backward(b, o));
            out.grad.insert(out.grad.end(), g.begin(), g.end());
            // token-level metrics weigh by kept tokens; luspo's sequence ratio makes the clip fractions means over
            // the micro-batch's rows (grpo_result: "sequence level: every row")
            const double w = gb.micro_batch_tokens()[i];
            const double wc = type == grpo_loss_type::luspo ? gb.micro_batch_rows()[i] : w;
            metrics.add_mean("kl", r.kl, w);
            metrics.add_mean("clip_ratio_low", r.clip_ratio_low, wc);
            metrics.add_mean("clip_ratio_high", r.clip_ratio_high, wc);
            metrics.add_mean("clip_ratio_region", r.clip_ratio_region, wc);
            metrics.add_mean("ratio_mean", r.ratio_mean, w);
            metrics.add_mean("approx_kl", r.approx_kl, w);
            metrics.add_mean("entropy", r.entropy, w);
          } else {
            // an empty micro-batch adds nothing but must add the same names (weight 0)
            for (const char* name :
                 {"kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "approx_kl", "entropy"})
              metrics.add_mean(name, ops::full(mask, shape_t{}, 0.0), 0.0);
          }
          at += m, ++i;
        }
        out.metrics = metrics.reduce(comm);
        return out;
      });
      const std::string what = std::string(grpo_loss_type_name(type)) + " world " + std::to_string(world);
      double total = 0;
      std::vector<std::vector<double>> grads;
      for (const auto& r : per_rank) total += r.loss, grads.push_back(r.grad);
      check_number(what + " loss", total, ops::item(full.loss), dist_tol<S>());
      check_all<S>(what + " gradient", joined(grads), full_grad);
      for (const auto& r : per_rank)
        for (const auto& [name, want] : full_metrics)
          check_number(what + " " + name, r.metrics.at(name), want, dist_tol<S>());
    }
  }
}

TEMPLATE_TEST_CASE("global masked mean / var / whiten equal the whole batch's", "[distributed][masked]", double,
                   float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  const T x = T_<S>(data().loss), mask = T_<S>(data().mask);
  const std::vector<whiten_options> whitenings{{},
                                               whiten_options::verl(),
                                               whiten_options::openrlhf(),
                                               whiten_options::openrlhf(false),
                                               {.keep_mean = true, .unbiased = false, .outside = whiten_outside::keep}};
  for (int world : {1, 2, 3, 4}) {
    const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
      const std::int64_t first = first_row(world, rank), n = rank_rows(world)[static_cast<std::size_t>(rank)];
      const T xr = rows_of(x, first, n), mr = rows_of(mask, first, n);
      std::vector<double> out{ops::item(global_masked_sum(xr, mr, comm)),
                              ops::item(global_masked_mean(xr, mr, comm)),
                              ops::item(global_masked_mean(xr, mr, comm, masked_options::verl())),
                              ops::item(global_masked_var(xr, mr, comm)),
                              ops::item(global_masked_var(xr, mr, comm, false)),
                              ops::item(global_masked_var(xr, mr, comm, true, masked_options::verl()))};
      std::vector<std::vector<double>> whitened;
      for (const auto& w : whitenings) whitened.push_back(host(global_masked_whiten(xr, mr, comm, w)));
      return std::make_pair(out, whitened);
    });
    const std::vector<double> want{ops::item(masked_sum(x, mask)),
                                   ops::item(masked_mean(x, mask)),
                                   ops::item(masked_mean(x, mask, std::nullopt, masked_options::verl())),
                                   ops::item(masked_var(x, mask)),
                                   ops::item(masked_var(x, mask, false)),
                                   ops::item(masked_var(x, mask, true, std::nullopt, masked_options::verl()))};
    for (const auto& r : per_rank)
      for (std::size_t k = 0; k < want.size(); ++k)
        check_number("world " + std::to_string(world) + " statistic " + std::to_string(k), r.first[k], want[k],
                     dist_tol<S>());
    for (std::size_t w = 0; w < whitenings.size(); ++w) {
      std::vector<std::vector<double>> parts;
      for (const auto& r : per_rank) parts.push_back(r.second[w]);
      check_all<S>("world " + std::to_string(world) + " whitening " + std::to_string(w), joined(parts),
                   masked_whiten(x, mask, whitenings[w]));
    }
  }
}

TEMPLATE_TEST_CASE("global group advantages: groups spread over ranks equal the whole batch's", "[distributed][group]",
                   double, float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  const auto& d = data();
  const T scores = T_<S>(d.scores), mask = T_<S>(d.mask), rewards = T_<S>(d.token_rewards);
  const eigen_index ids = id_rows(0, B);
  const std::vector<group_options> grpo_opts{{},
                                             {.scale = group_scale::batch},
                                             {.scale = group_scale::none},
                                             {.eps = 1e-6, .std_floor = 1e-3, .singleton = singleton_policy::raw}};
  for (int world : {1, 2, 3, 4}) {
    const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
      const std::int64_t first = first_row(world, rank), n = rank_rows(world)[static_cast<std::size_t>(rank)];
      const T s = rows_of(scores, first, n), m = rows_of(mask, first, n);
      const eigen_index g = id_rows(first, n);
      std::vector<std::vector<double>> out;
      for (const auto& o : grpo_opts) {
        const auto r = global_grpo_advantages(s, g, comm, o);
        out.push_back(host(r.advantages));
        out.push_back(host(r.group_mean));
        out.push_back(host(r.group_std));
        out.push_back({ops::item(r.frac_reward_zero_std)});
      }
      out.push_back(host(global_rloo_advantages(s, g, comm)));
      out.push_back(host(global_rloo_advantages(s, g, comm, singleton_policy::raw)));
      out.push_back(host(global_gpg_advantages(s, g, comm, 2.0)));
      out.push_back(host(global_grpo_passk_advantages(s, g, comm)));
      out.push_back(host(global_opo_advantages(s, m, g, comm)));
      out.push_back(host(global_reinforce_pp_advantages(rows_of(rewards, first, n), m, comm, 0.9)));
      out.push_back(host(global_reinforce_pp_baseline_advantages(rows_of(rewards, first, n), m, g, comm)));
      return out;
    });
    std::vector<eigen_tensor<S>> want;
    for (const auto& o : grpo_opts) {
      const auto r = grpo_advantages(scores, ids, o);
      want.insert(want.end(), {r.advantages, r.group_mean, r.group_std});
      want.push_back(ops::reshape(r.frac_reward_zero_std, shape_t{1}));
    }
    const std::size_t scalar_every = 4;
    want.push_back(rloo_advantages(scores, ids));
    want.push_back(rloo_advantages(scores, ids, singleton_policy::raw));
    want.push_back(gpg_advantages(scores, ids, 2.0));
    want.push_back(grpo_passk_advantages(scores, ids));
    want.push_back(opo_advantages(scores, mask, ids));
    want.push_back(reinforce_pp_advantages(rewards, mask, 0.9));
    want.push_back(reinforce_pp_baseline_advantages(rewards, mask, ids));
    for (std::size_t k = 0; k < want.size(); ++k) {
      const std::string what = "world " + std::to_string(world) + " estimate " + std::to_string(k);
      if (k < grpo_opts.size() * scalar_every && k % scalar_every == 3) {  // a whole-batch scalar on every rank
        for (const auto& r : per_rank) check_number(what, r[k][0], ops::item(want[k]), dist_tol<S>());
        continue;
      }
      std::vector<std::vector<double>> parts;
      for (std::size_t r = 0; r < per_rank.size(); ++r)
        if (k < per_rank[r].size()) parts.push_back(per_rank[r][k]);
      check_all<S>(what, joined(parts), want[k]);
    }
  }
}

TEMPLATE_TEST_CASE("global top-entropy mask and controller KL equal the whole batch's", "[distributed][entropy][kl]",
                   double, float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  const T ent = T_<S>(data().entropies), mask = T_<S>(data().mask), kl = T_<S>(data().loss);
  for (int world : {1, 2, 3, 4}) {
    const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
      const std::int64_t first = first_row(world, rank), n = rank_rows(world)[static_cast<std::size_t>(rank)];
      const T e = rows_of(ent, first, n), m = rows_of(mask, first, n), k = rows_of(kl, first, n);
      std::vector<std::vector<double>> out;
      for (double q : {0.0, 0.2, 0.5, 1.0}) out.push_back(host(global_top_entropy_mask(e, m, q, comm)));
      out.push_back({global_mean_kl(k, m, comm, aggregation::token_mean),
                     global_mean_kl(k, m, comm, aggregation::seq_mean_token_mean),
                     global_mean_kl(k, m, comm, aggregation::seq_mean_token_sum)});
      return out;
    });
    std::size_t j = 0;
    for (double q : {0.0, 0.2, 0.5, 1.0}) {
      std::vector<std::vector<double>> parts;
      for (const auto& r : per_rank) parts.push_back(r[j]);
      const auto want = host(top_entropy_mask(ent, mask, q));
      INFO("world " << world << " q " << q);
      CHECK(joined(parts) == want);  // a selection: exactly the same tokens
      ++j;
    }
    const double want[] = {ops::item(aggregate(kl, mask, aggregation::token_mean)),
                           ops::item(aggregate(kl, mask, aggregation::seq_mean_token_mean)),
                           ops::item(aggregate(kl, mask, aggregation::seq_mean_token_sum))};
    for (const auto& r : per_rank)
      for (std::size_t k = 0; k < 3; ++k)
        check_number("world " + std::to_string(world) + " kl " + std::to_string(k), r[j][k], want[k], dist_tol<S>());
  }
}

TEST_CASE("global forms: the communication of a GRPO step is O(1) small collectives, counted", "[distributed][cost]") {
  using T = eigen_tensor<double>;
  const T scores = T_<double>(data().scores), mask = T_<double>(data().mask);
  test::thread_group<double> group(3);
  (void)run_ranks<double>(
      3,
      [&](int rank, const communicator<T>& comm) {
        const std::int64_t first = first_row(3, rank), n = rank_rows(3)[static_cast<std::size_t>(rank)];
        (void)global_grpo_advantages(rows_of(scores, first, n), id_rows(first, n), comm);
        const global_batch gb(std::vector<T>{rows_of(mask, first, n)}, comm);
        global_metrics<T> m;
        m.add_mean("entropy", ops::full(mask, shape_t{}, 1.0), 1.0);
        m.add_max("max", ops::full(mask, shape_t{}, 1.0));
        (void)m.reduce(comm);
        return 0;
      },
      &group);
  for (int r = 0; r < 3; ++r) {
    // advantages: 3 all-gathers (lengths + options hash, scores, ids); global_batch: 1 all-gather (options hash)
    // and 2 all-reduces (counts, width); metrics: 1 all-gather (names hash), 1 all-reduce per kind used
    CHECK(group.all_gathers(r) == 3 + 1 + 1);
    CHECK(group.all_reduces(r) == 2 + 2);
  }
}

TEST_CASE("global forms reject bad communicators and inputs with posttrain::error", "[distributed][errors]") {
  using T = eigen_tensor<double>;
  const T mask = T_<double>(data().mask), x = T_<double>(data().loss), scores = T_<double>(data().scores);
  const eigen_index ids = id_rows(0, B);
  const auto single = single_process<T>();
  const auto throws_with = [](auto&& f, const std::string& text) {
    try {
      f();
    } catch (const posttrain::error& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(text) != std::string::npos);
      return;
    }
    FAIL("no posttrain::error (" << text << ")");
  };
  SECTION("null callbacks") {
    for (int k = 0; k < 5; ++k) {
      auto c = single;
      const char* name[] = {"comm.rank", "comm.world_size", "comm.all_reduce", "comm.all_gather",
                            "comm.all_gather_index"};
      if (k == 0) c.rank = nullptr;
      if (k == 1) c.world_size = nullptr;
      if (k == 2) c.all_reduce = nullptr;
      if (k == 3) c.all_gather = nullptr;
      if (k == 4) c.all_gather_index = nullptr;
      throws_with([&] { (void)global_masked_mean(x, mask, c); }, std::string("global_masked_mean: ") + name[k]);
      throws_with([&] { (void)global_batch(std::vector<T>{mask}, c); }, std::string("global_batch: ") + name[k]);
    }
  }
  SECTION("bad rank or world size") {
    auto c = single;
    c.world_size = [] { return 0; };
    throws_with([&] { (void)global_masked_var(x, mask, c); }, "comm.world_size() must be >= 1, got 0");
    c.world_size = [] { return 2; };
    c.rank = [] { return 2; };
    throws_with([&] { (void)global_grpo_advantages(scores, ids, c); }, "comm.rank() must be in [0, 2), got 2");
    c.rank = [] { return -1; };
    throws_with([&] { (void)global_top_entropy_mask(x, mask, 0.5, c); }, "comm.rank() must be in [0, 2), got -1");
  }
  SECTION("a communicator that returns the wrong shape") {
    auto c = single;
    c.all_gather = [](const T& t) { return ops::concat(std::vector<T>{t, t}, 0); };
    throws_with([&] { (void)global_rloo_advantages(scores, ids, c); }, "comm.all_gather returned shape [4]");
    auto d = single;
    d.all_reduce = [](const T& t, reduce_op) { return ops::reshape(t, shape_t{ops::numel(t), 1}); };
    throws_with([&] { (void)global_masked_mean(x, mask, d); }, "comm.all_reduce(sum) returned shape [2, 1]");
  }
  SECTION("global_batch inputs and options") {
    throws_with([&] { (void)global_batch(std::vector<T>{}, single); }, "global_batch: masks is empty");
    throws_with(
        [&] {
          (void)global_batch(std::vector<T>{mask, ops::reshape(mask, shape_t{B * W})}, single);
        },
        "masks[1] must have rank 2");
    throws_with([&] { (void)global_batch(std::vector<T>{mask}, single, {.max_completion_length = 0}); },
                "options.max_completion_length must be > 0, got 0");
    throws_with([&] { (void)global_batch(std::vector<T>{mask}, single, {.sync = static_cast<gradient_sync>(7)}); },
                "options.sync must be");
  }
  SECTION("inputs of the global forms") {
    throws_with([&] { (void)global_masked_mean(x, ops::slice(mask, 0, 0, 2), single); },
                "global_masked_mean: mask has shape");
    throws_with([&] { (void)global_masked_mean(x, mask, single, {.count_eps = -1}); },
                "options.count_eps must be >= 0");
    throws_with([&] { (void)global_masked_whiten(x, mask, single, {.eps = 0}); }, "options.eps must be > 0");
    throws_with([&] { (void)global_grpo_advantages(x, ids, single); },
                "global_grpo_advantages: scores must have rank 1");
    throws_with([&] { (void)global_grpo_advantages(scores, id_rows(0, 3), single); },
                "group_index has shape [3] but scores has shape [13]");
    throws_with([&] { (void)global_grpo_advantages(scores, ids, single, {.eps = 0}); }, "options.eps must be > 0");
    throws_with([&] { (void)global_grpo_advantages(ops::slice(scores, 0, 0, 0), id_rows(0, 0), single); },
                "every rank's scores is empty");
    throws_with([&] { (void)global_top_entropy_mask(x, mask, 1.5, single); },
                "top_quantile must be in [0, 1], got 1.5");
    throws_with([&] { (void)global_mean_kl(x, mask, single, aggregation::sum); }, "global_mean_kl: mode must be");
    global_metrics<T> m;
    throws_with([&] { (void)m.reduce(single); }, "global_metrics::reduce: no metric was added");
    throws_with([&] { m.add_mean("a", x, 1.0); }, "value of a must have one element");
    throws_with([&] { m.add_mean("a", ops::full(x, shape_t{}, 1.0), -1.0); }, "weight must be >= 0, got -1");
    m.add_max("b", ops::full(x, shape_t{}, 1.0));
    throws_with([&] { m.add_min("b", ops::full(x, shape_t{}, 1.0)); }, "b was added before with another combination");
  }
  SECTION("options that differ across ranks") {
    const auto rejected = [&](auto&& f) {
      try {
        (void)run_ranks<double>(2, f);
      } catch (const posttrain::error& e) {
        return std::string(e.what());
      }
      return std::string("no error");
    };
    const auto e1 = rejected([&](int rank, const communicator<T>& comm) {
      return host(global_grpo_advantages(scores, ids, comm, {.eps = rank == 0 ? 1e-4 : 1e-6}).advantages);
    });
    CHECK(e1.find("global_grpo_advantages: the options differ across ranks") != std::string::npos);
    const auto e2 = rejected([&](int rank, const communicator<T>& comm) {
      return global_batch(std::vector<T>{mask}, comm, {.sync = rank == 0 ? gradient_sync::sum : gradient_sync::average})
          .tokens();
    });
    CHECK(e2.find("global_batch: the options (sync, max_completion_length) differ across ranks") != std::string::npos);
    const auto e3 = rejected([&](int rank, const communicator<T>& comm) {
      global_metrics<T> m;
      m.add_mean(rank == 0 ? "a" : "b", ops::full(x, shape_t{}, 1.0), 1.0);
      return m.reduce(comm).size();
    });
    CHECK(e3.find("global_metrics::reduce: the metric names differ across ranks") != std::string::npos);
  }
}

TEST_CASE("single_process: every global form is its single-process function", "[distributed][single]") {
  using T = eigen_tensor<double>;
  const T mask = T_<double>(data().mask), x = T_<double>(data().loss), scores = T_<double>(data().scores);
  const eigen_index ids = id_rows(0, B);
  const auto c = single_process<T>();
  CHECK(c.rank() == 0);
  CHECK(c.world_size() == 1);
  // identical, not merely close: the same formulas on the same data
  CHECK(host(global_grpo_advantages(scores, ids, c).advantages) == host(grpo_advantages(scores, ids).advantages));
  CHECK(host(global_masked_whiten(x, mask, c)) == host(masked_whiten(x, mask)));
  CHECK(ops::item(global_masked_mean(x, mask, c)) == ops::item(masked_mean(x, mask)));
  const global_batch gb(std::vector<T>{mask}, c);
  CHECK(ops::item(aggregate(x, mask, aggregation::token_mean, gb.normalizer(aggregation::token_mean))) ==
        ops::item(aggregate(x, mask, aggregation::token_mean)));
}

namespace {

/// A rank's micro-batches of the whole batch's policy inputs (rows [first, first + n), split by micro_sizes; an
/// empty [0, T] micro-batch included), with the whole batch's per-row advantages.
template <class S>
std::vector<policy_batch<eigen_tensor<S>>> policy_micro_batches(std::int64_t first, std::int64_t n) {
  using T = eigen_tensor<S>;
  const auto& d = data();
  const T lp = T_<S>(d.logprobs), old = T_<S>(d.old_logprobs), mask = T_<S>(d.mask), ent = T_<S>(d.entropies);
  const T adv = grpo_advantages(T_<S>(d.scores), id_rows(0, B)).advantages;
  std::vector<policy_batch<T>> out;
  std::int64_t at = first;
  for (auto m : micro_sizes(n)) {
    out.push_back({.logprobs = rows_of(lp, at, m),
                   .advantages = rows_of(adv, at, m),
                   .response_mask = rows_of(mask, at, m),
                   .old_logprobs = rows_of(old, at, m),
                   .entropies = rows_of(ent, at, m)});
    at += m;
  }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE(
    "global Clip-Cov / KL-Cov selection: the same tokens, loss and gradient as one process on the whole batch",
    "[distributed][cov]", double, float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  const auto whole = policy_micro_batches<S>(0, B);
  policy_batch<T> full_batch = whole[0];  // the whole batch in one piece
  {
    const auto& d = data();
    full_batch = {.logprobs = T_<S>(d.logprobs),
                  .advantages = grpo_advantages(T_<S>(d.scores), id_rows(0, B)).advantages,
                  .response_mask = T_<S>(d.mask),
                  .old_logprobs = T_<S>(d.old_logprobs),
                  .entropies = T_<S>(d.entropies)};
  }
  // candidates: the covariances of this data lie in about ±1, so Clip-Cov's band is (-0.5, 0.5) (verl's (1, 5)
  // would leave none); ratios large enough to pick several tokens of the ~50 valid ones
  std::vector<policy_variant_options> opts;
  for (auto variant : {policy_variant::clip_cov, policy_variant::kl_cov})
    for (auto rule : {cov_rule::random, cov_rule::top})
      for (std::uint64_t seed : {0u, 7u}) {
        policy_variant_options o{.variant = variant, .clip = {.clip_low = 0.1}};
        o.clip_cov_ratio = 0.25, o.clip_cov_lb = -0.5, o.clip_cov_ub = 0.5, o.kl_cov_ratio = 0.2;
        o.cov_selection = rule, o.cov_seed = seed;
        if (rule == cov_rule::top && seed != 0) o.kl_cov_ratio = 0.01;  // k = max(⌊0.01 N⌋, 1) = 1
        opts.push_back(o);
      }
  for (const auto& opt : opts) {
    const auto full = policy_variant_loss(full_batch, opt);
    const T full_grad = policy_variant_loss_backward(full_batch, opt);
    const auto full_sel = host(full.cov_selected);
    double selected = 0;
    for (double v : full_sel) selected += v;
    const std::string name = std::string(opt.variant == policy_variant::clip_cov ? "clip_cov" : "kl_cov") +
                             (opt.cov_selection == cov_rule::top ? " top" : " random") + " seed " +
                             std::to_string(opt.cov_seed);
    INFO(name << ": " << selected << " tokens selected");
    CHECK(selected >= 1);  // the test selects something (and Clip-Cov's band has candidates)
    for (int world : {1, 2, 3, 4}) {
      struct rank_out {
        std::vector<double> selection, used, grad;
        double loss = 0;
      };
      const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
        const std::int64_t first = first_row(world, rank), n = rank_rows(world)[static_cast<std::size_t>(rank)];
        const auto mbs = policy_micro_batches<S>(first, n);
        const auto sel = global_cov_selection(mbs, comm, opt);
        std::vector<T> masks;
        for (const auto& b : mbs) masks.push_back(b.response_mask);
        const global_batch gb(masks, comm);
        policy_variant_options o = opt;
        o.normalizer = gb.normalizer(o.reduction);
        rank_out out;
        for (std::size_t i = 0; i < mbs.size(); ++i) {
          const auto s = host(sel[i]);
          out.selection.insert(out.selection.end(), s.begin(), s.end());
          if (ops::size(mbs[i].logprobs, 0) == 0) continue;
          auto b = mbs[i];
          b.cov_selection = sel[i];
          const auto r = policy_variant_loss(b, o);
          out.loss += ops::item(r.loss);
          const auto u = host(r.cov_selected);  // what the loss applied
          out.used.insert(out.used.end(), u.begin(), u.end());
          const auto g = host(policy_variant_loss_backward(b, o));
          out.grad.insert(out.grad.end(), g.begin(), g.end());
        }
        return out;
      });
      const std::string what = name + " world " + std::to_string(world);
      std::vector<std::vector<double>> sels, used, grads;
      double total = 0;
      for (const auto& r : per_rank)
        sels.push_back(r.selection), used.push_back(r.used), grads.push_back(r.grad), total += r.loss;
      INFO(what);
      CHECK(joined(sels) == full_sel);  // a selection: exactly the same tokens
      CHECK(joined(used) == full_sel);
      check_number(what + " loss", total, ops::item(full.loss), dist_tol<S>());
      check_all<S>(what + " gradient", joined(grads), full_grad);
    }
  }
}

TEMPLATE_TEST_CASE(
    "global top-entropy threshold inside grpo_loss and policy_variant_loss: loss, gradient and kept tokens of the "
    "whole batch",
    "[distributed][entropy][grpo]", double, float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  const auto& d = data();
  const T mask = T_<S>(d.mask), lp = T_<S>(d.logprobs), old = T_<S>(d.old_logprobs), ent = T_<S>(d.entropies);
  const T adv = grpo_advantages(T_<S>(d.scores), id_rows(0, B)).advantages;
  const auto grpo_of = [&](std::int64_t at, std::int64_t n) {
    return grpo_batch<T>{.logprobs = rows_of(lp, at, n),
                         .advantages = rows_of(adv, at, n),
                         .response_mask = rows_of(mask, at, n),
                         .old_logprobs = rows_of(old, at, n),
                         .entropies = rows_of(ent, at, n)};
  };
  const auto variant_of = [&](std::int64_t at, std::int64_t n) {
    return policy_batch<T>{.logprobs = rows_of(lp, at, n),
                           .advantages = rows_of(adv, at, n),
                           .response_mask = rows_of(mask, at, n),
                           .old_logprobs = rows_of(old, at, n),
                           .entropies = rows_of(ent, at, n)};
  };
  for (double q : {0.2, 0.5, 1.0}) {
    const grpo_options gopt{.loss_type = grpo_loss_type::dapo, .top_entropy_quantile = q};
    policy_variant_options vopt{.variant = policy_variant::cispo, .top_entropy_quantile = q};
    const auto gfull = grpo_loss(grpo_of(0, B), gopt);
    const T gfull_grad = grpo_loss_backward(grpo_of(0, B), gopt);
    const auto vfull = policy_variant_loss(variant_of(0, B), vopt);
    const T vfull_grad = policy_variant_loss_backward(variant_of(0, B), vopt);
    // single process: the threshold of the whole batch gives exactly the quantile option's result
    {
      const double thr =
          global_top_entropy_threshold(std::vector<T>{ent}, std::vector<T>{mask}, q, single_process<T>());
      grpo_options g1 = gopt;
      g1.top_entropy_quantile.reset(), g1.top_entropy_threshold = thr;
      CHECK(ops::item(grpo_loss(grpo_of(0, B), g1).loss) == ops::item(gfull.loss));
      policy_variant_options v1 = vopt;
      v1.top_entropy_quantile.reset(), v1.top_entropy_threshold = thr;
      CHECK(host(policy_variant_loss(variant_of(0, B), v1).token_keep) == host(vfull.token_keep));
    }
    for (int world : {1, 2, 3, 4}) {
      struct rank_out {
        double gloss = 0, vloss = 0;
        std::vector<double> ggrad, vgrad, keep;
      };
      const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
        const std::int64_t first = first_row(world, rank), n = rank_rows(world)[static_cast<std::size_t>(rank)];
        std::vector<T> masks, ents;
        std::int64_t at = first;
        for (auto m : micro_sizes(n))
          masks.push_back(rows_of(mask, at, m)), ents.push_back(rows_of(ent, at, m)), at += m;
        const double thr = global_top_entropy_threshold(ents, masks, q, comm);
        const global_batch gb(masks, comm);
        grpo_options g = gopt;
        g.top_entropy_quantile.reset(), g.top_entropy_threshold = thr, g.normalizer = gb.normalizer(g.loss_type);
        policy_variant_options v = vopt;
        v.top_entropy_quantile.reset(), v.top_entropy_threshold = thr, v.normalizer = gb.normalizer(v.reduction);
        rank_out out;
        at = first;
        for (auto m : micro_sizes(n)) {
          if (m > 0) {
            out.gloss += ops::item(grpo_loss(grpo_of(at, m), g).loss);
            const auto gg = host(grpo_loss_backward(grpo_of(at, m), g));
            out.ggrad.insert(out.ggrad.end(), gg.begin(), gg.end());
            const auto r = policy_variant_loss(variant_of(at, m), v);
            out.vloss += ops::item(r.loss);
            const auto k = host(r.token_keep);
            out.keep.insert(out.keep.end(), k.begin(), k.end());
            const auto vg = host(policy_variant_loss_backward(variant_of(at, m), v));
            out.vgrad.insert(out.vgrad.end(), vg.begin(), vg.end());
          }
          at += m;
        }
        return out;
      });
      const std::string what = "q " + std::to_string(q) + " world " + std::to_string(world);
      double gl = 0, vl = 0;
      std::vector<std::vector<double>> gg, vg, keep;
      for (const auto& r : per_rank)
        gl += r.gloss, vl += r.vloss, gg.push_back(r.ggrad), vg.push_back(r.vgrad), keep.push_back(r.keep);
      INFO(what);
      CHECK(joined(keep) == host(vfull.token_keep));  // exactly the same tokens
      check_number(what + " grpo loss", gl, ops::item(gfull.loss), dist_tol<S>());
      check_all<S>(what + " grpo gradient", joined(gg), gfull_grad);
      check_number(what + " cispo loss", vl, ops::item(vfull.loss), dist_tol<S>());
      check_all<S>(what + " cispo gradient", joined(vg), vfull_grad);
    }
  }
}

TEMPLATE_TEST_CASE("global grpo_advantages_multi: every reward column gathered, every mode equals the whole batch's",
                   "[distributed][group][multi]", double, float) {
  using S = TestType;
  using T = eigen_tensor<S>;
  constexpr std::int64_t K = 3;
  auto r = test::random_normal({B, K}, 19);
  for (auto& v : r.values) v = std::round(2 * v);  // ties inside groups, some all-equal columns per group
  const T rewards = T_<S>(r);
  const std::vector<double> weights{1.0, 0.5, -2.0};
  const std::vector<std::pair<multi_reward, group_options>> cases{
      {multi_reward::sum_then_normalize, {}},
      {multi_reward::normalize_then_sum, {}},
      {multi_reward::normalize_then_sum_batch, {}},
      {multi_reward::sum_then_normalize, {.scale = group_scale::batch, .eps = 1e-6}},
      {multi_reward::normalize_then_sum, {.scale = group_scale::none, .singleton = singleton_policy::raw}}};
  for (int world : {1, 2, 3, 4}) {
    const auto per_rank = run_ranks<S>(world, [&](int rank, const communicator<T>& comm) {
      const std::int64_t first = first_row(world, rank), n = rank_rows(world)[static_cast<std::size_t>(rank)];
      std::vector<std::vector<double>> out;
      for (const auto& [mode, o] : cases)
        out.push_back(
            host(global_grpo_advantages_multi(rows_of(rewards, first, n), weights, id_rows(first, n), comm, mode, o)));
      return out;
    });
    for (std::size_t c = 0; c < cases.size(); ++c) {
      std::vector<std::vector<double>> parts;
      for (const auto& pr : per_rank) parts.push_back(pr[c]);
      check_all<S>("world " + std::to_string(world) + " case " + std::to_string(c), joined(parts),
                   grpo_advantages_multi(rewards, weights, id_rows(0, B), cases[c].first, cases[c].second));
    }
  }
}

TEST_CASE("global selections: communication counted, bad inputs rejected", "[distributed][cov][errors]") {
  using T = eigen_tensor<double>;
  const T mask = T_<double>(data().mask), ent = T_<double>(data().entropies);
  const policy_variant_options kl{.variant = policy_variant::kl_cov};
  test::thread_group<double> group(3);
  (void)run_ranks<double>(
      3,
      [&](int rank, const communicator<T>& comm) {
        const std::int64_t first = first_row(3, rank), n = rank_rows(3)[static_cast<std::size_t>(rank)];
        return global_cov_selection(policy_micro_batches<double>(first, n), comm, kl).size();
      },
      &group);
  // means: 1 all-reduce; lengths + options hash, covariances: 2 all-gathers
  for (int r = 0; r < 3; ++r) CHECK((group.all_reduces(r) == 1 && group.all_gathers(r) == 2));
  const auto single = single_process<T>();
  const auto mbs = policy_micro_batches<double>(0, B);
  const auto throws_with = [](auto&& f, const std::string& text) {
    try {
      f();
    } catch (const posttrain::error& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(text) != std::string::npos);
      return;
    }
    FAIL("no posttrain::error (" << text << ")");
  };
  throws_with([&] { (void)global_cov_selection(mbs, single, policy_variant_options{}); },
              "global_cov_selection: options.variant must be clip_cov or kl_cov");
  throws_with([&] { (void)global_cov_selection(std::vector<policy_batch<T>>{}, single, kl); },
              "global_cov_selection: micro_batches is empty");
  auto b = mbs[0];
  b.cov_selection = ops::full_like(b.logprobs, 0.0);
  throws_with([&] { (void)policy_variant_loss(b, policy_variant_options{}); },
              "policy_variant_loss: cov_selection applies to variant clip_cov or kl_cov");
  b.cov_selection = ops::slice(b.logprobs, 0, 0, 1);
  throws_with([&] { (void)policy_variant_loss(b, kl); }, "cov_selection");
  throws_with([&] { (void)policy_variant_loss(mbs[0], {.top_entropy_quantile = 0.5, .top_entropy_threshold = 1.0}); },
              "options.top_entropy_quantile (0.5) and options.top_entropy_threshold (1) are both set");
  auto nb = mbs[0];
  nb.entropies.reset();
  throws_with([&] { (void)policy_variant_loss(nb, {.top_entropy_threshold = 1.0}); },
              "entropies is required when options.top_entropy_threshold is set");
  throws_with([&] { (void)global_top_entropy_threshold(std::vector<T>{ent}, std::vector<T>{}, 0.5, single); },
              "global_top_entropy_threshold: masks has 0 micro-batches but entropies has 1");
  throws_with([&] { (void)global_top_entropy_threshold(std::vector<T>{ent}, std::vector<T>{mask}, -0.1, single); },
              "top_quantile must be in [0, 1]");
  const T rewards = T_<double>(test::random_normal({B, 2}, 20));
  throws_with([&] { (void)global_grpo_advantages_multi(rewards, {1.0}, id_rows(0, B), single); },
              "global_grpo_advantages_multi: weights has 1 entries but rewards has K = 2 columns");
  throws_with(
      [&] {
        (void)global_grpo_advantages_multi(rewards, {1.0, 1.0}, id_rows(0, 3), single);
      },
      "group_index has shape [3]");
  // options that differ across ranks: every rank throws at the same collective (nothing hangs)
  const auto rejected = [&](auto&& f) {
    try {
      (void)run_ranks<double>(2, f);
    } catch (const posttrain::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto e1 = rejected([&](int rank, const communicator<T>& comm) {
    return global_top_entropy_threshold(std::vector<T>{ent}, std::vector<T>{mask}, rank == 0 ? 0.2 : 0.3, comm);
  });
  CHECK(e1.find("global_top_entropy_threshold: the top_quantile values differ across ranks") != std::string::npos);
  const auto e2 = rejected([&](int rank, const communicator<T>& comm) {
    policy_variant_options o = kl;
    o.cov_seed = static_cast<std::uint64_t>(rank);
    return global_cov_selection(mbs, comm, o).size();
  });
  CHECK(e2.find("global_cov_selection: the options differ across ranks") != std::string::npos);
  const auto e3 = rejected([&](int rank, const communicator<T>& comm) {
    return host(global_grpo_advantages_multi(rewards, {1.0, rank == 0 ? 1.0 : 2.0}, id_rows(0, B), comm));
  });
  CHECK(e3.find("global_grpo_advantages_multi: the options differ across ranks") != std::string::npos);
}

}  // namespace test_distributed
