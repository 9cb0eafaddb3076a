// posttrain/kernels/logits_cpu.hpp — fused CPU kernels for the logits hot path.
//
// One implementation over raw row-major float/double buffers, shared by the Eigen backend and
// LibTorch CPU tensors (through their data pointers, no copies). Per row of logits x[0..V):
//   forward   one read of the row, online max/sum in blocks (Milakov & Gimelshein, arXiv:1805.02867):
//             m = max x, s = Σ e^{x-m}, t = Σ e^{x-m}(x-m), giving
//             logsumexp = m + log s, log p[y] = (x_y - m) - log s, entropy H = log s - t/s
//             (verl's fused linear-logprob kernel keeps the same running sums)
//   backward  out[v] = p_v·(α + β·log p_v) − b·[v = y] − c, written into a caller's buffer or in
//             place over the logits (Liger / llm.c): cross-entropy, selective log-softmax, entropy
//             and logsumexp gradients are all of this form with per-row coefficients.
// Vectorised with Eigen's packet math (the block max with Eigen's redux, then one loop per block
// of packet exp with per-lane accumulators for s and t, the next block prefetched); compile with
// -march=native (or -mavx2 -mfma) for wide packets: the x86-64 default is 4-float SSE2. Each block
// of `block_size` elements is reduced per lane and the block totals are added in double, so
// float32 sums over V = 256000 stay within a few ulp of the double result (a plain sequential
// float sum loses ~1e-4). A backward into a separate buffer keeps the statistics pass's
// exponentials there and rescales them per block (one exp per logit instead of two). Differences are taken against the
// row max first, so |logits| ~ 1e4 keeps full float32 precision (x - logsumexp(x) would lose ulp(1e4) ~ 5e-4). -inf
// logits (vocabulary padding) contribute 0 and get gradient 0; a row of only -inf gives logsumexp -inf, entropy 0; a
// row containing NaN gives NaN; +inf gives logsumexp +inf.
//
// Temperature (TRL GRPOTrainer._get_per_token_logps `logits /= self.temperature`, verl
// `logits.div_(temperature)`): every statistic may be taken of z = a·x with a = 1/T > 0 instead of x.
// The row max is that of x (a > 0 keeps the order), the differences are scaled once, d = a·(x - m),
// so no [N, V] copy of x/T is made; row_stats remembers a (inv_t), its logsumexp is a·m + log s,
// and the backward writers take coefficients of the gradient with respect to z and apply the chain
// rule dz/dx = a themselves. a = 1 runs the unscaled loops (bit-identical to a kernel without it).
//
// bfloat16 logits (Eigen::bfloat16, layout-compatible with at::BFloat16) are read natively: the
// statistics pass widens one packet at a time in registers (bf16 -> float32 is a 16-bit shift) and
// accumulates exactly as the float32 pass does over the widened values, so its row_stats equal those
// of the widened row bit for bit; the backward writer (write_row_backward_16) widens a packet,
// computes its float32 gradient from the statistics and narrows it to bf16 (round to nearest even),
// all in registers, so the gradient equals the float32 one of the widened row within bf16 rounding.
// float16 (Eigen::half, layout-compatible with at::Half) is read the same way (vcvtph2ps / vcvtps2ph
// with AVX-512 or F16C; a scalar conversion otherwise).
//
// Threads: rows are split into contiguous ranges (kernels/parallel.hpp: `num_threads()` of them at
// most, run on LibTorch's intra-op pool in a torch program, `set_num_threads(n)` overrides). A row
// is always reduced by one thread in one order, so results do not depend on the thread count.
#pragma once

#include <Eigen/Core>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "posttrain/kernels/parallel.hpp"

namespace posttrain::kernels {

/// Elements reduced per block: fits L1 twice over (the row block and its exponentials).
inline constexpr std::int64_t block_size = 2048;

/// Online statistics of one row: m = max x, log_s = log Σ e^{x-m}, t_over_s = Σ e^{x-m}(x-m) / s.
/// With a temperature (inv_t = a = 1/T != 1) the sums are of d = a·(x - m): the statistics of z = a·x.
template <class S>
struct row_stats {
  S m;
  double log_s;
  double t_over_s;
  double inv_t = 1.0;  ///< a = 1/T: the statistics are those of a·x (m stays the max of x)
  bool finite() const { return std::isfinite(m); }
  /// logsumexp(a·x) = a·m + log s.
  double logsumexp() const {
    const double am = inv_t == 1.0 ? static_cast<double>(m) : inv_t * static_cast<double>(m);
    return finite() ? am + log_s : am;
  }
  /// H = -Σ p log p = log s - t/s; a row of only -inf (or with +inf) is a point mass or empty: 0.
  double entropy() const { return finite() ? log_s - t_over_s : (std::isnan(m) ? m : 0.0); }
  /// log softmax(a·x)[v] = a·(x_v - m) - log s of a finite row (x_v - m first: exact near the max).
  double logp(S x_v) const {
    const double d = static_cast<double>(x_v - m);
    return (inv_t == 1.0 ? d : d * inv_t) - log_s;
  }
};

namespace detail {

// Differences x - m below this are clamped: e^{-1000} is 0 in both precisions (Eigen's double exp
// returns 5.6e-309 at the bottom of its range), and the clamp keeps 0·(-inf) out of t.
template <class S>
inline constexpr S diff_floor = S(-1000);

template <class S>
using array_t = Eigen::Array<S, Eigen::Dynamic, 1>;

}  // namespace detail

/// The compute type of logits of type Src: double stays double, float, bfloat16 and float16 are computed in float.
template <class Src>
using compute_of = std::conditional_t<std::is_same_v<Src, double>, double, float>;

namespace detail {

template <class Src>
inline constexpr bool is_bf16 = std::is_same_v<Src, Eigen::bfloat16>;
template <class Src>
inline constexpr bool is_f16 = std::is_same_v<Src, Eigen::half>;
/// A 16-bit floating type read natively (widened to float32 in registers).
template <class Src>
inline constexpr bool is_16bit = is_bf16<Src> || is_f16<Src>;

/// bf16 -> float32: the 16 bits become the high half of the float (exact).
inline float widen(Eigen::bfloat16 h) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(std::bit_cast<std::uint16_t>(h)) << 16);
}
/// float16 -> float32 (exact; F16C where available).
inline float widen(Eigen::half h) { return static_cast<float>(h); }
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }

/// float32 -> bf16, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's and Eigen's conversion).
inline std::uint16_t narrow_bits(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t r = static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? std::uint16_t{0x7FC0} : r;
}

/// One packet of Src widened to the compute packet P (a plain unaligned load for float/double; for
/// bf16 a zero-extend and 16-bit shift of L lanes in registers; for fp16 vcvtph2ps).
template <class P, class Src>
inline P load_packet(const Src* p) {
  using namespace Eigen::internal;
  if constexpr (is_f16<Src>) {
#if defined(__AVX512F__)
    if constexpr (unpacket_traits<P>::size == 16)  // Packet16f
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#endif
#if defined(__AVX2__) && defined(__F16C__)
    if constexpr (unpacket_traits<P>::size == 8)  // Packet8f
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
    constexpr int L = unpacket_traits<P>::size;
    alignas(64) float tmp[L];
    for (int k = 0; k < L; ++k) tmp[k] = widen(p[k]);
    return pload<P>(tmp);
  } else if constexpr (!is_bf16<Src>) {
    return ploadu<P>(p);
  } else {
#if defined(__AVX512F__)
    if constexpr (unpacket_traits<P>::size == 16)  // Packet16f
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#endif
#if defined(__AVX2__)
    if constexpr (unpacket_traits<P>::size == 8)  // Packet8f
      return _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#endif
    constexpr int L = unpacket_traits<P>::size;
    alignas(64) float tmp[L];
    for (int k = 0; k < L; ++k) tmp[k] = widen(p[k]);
    return pload<P>(tmp);
  }
}

/// Stores the L lanes of float packet g narrowed to bf16 (narrow_bits: round to nearest even,
/// NaN -> 0x7FC0) at d: AVX-512 or AVX2 integer arithmetic in registers where available.
template <class P>
inline void store_narrow(std::uint16_t* d, const P& g) {
  constexpr int L = Eigen::internal::unpacket_traits<P>::size;
#if defined(__AVX512F__)
  if constexpr (L == 16) {  // Packet16f
    const __m512 f = g;
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(r));
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (L == 8) {  // Packet8f
    const __m256 f = g;
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);  // lanes 0-7 in the low half
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_castsi256_si128(p));
    return;
  }
#endif
  alignas(64) float t[L];
  Eigen::internal::pstore(t, g);
  for (int k = 0; k < L; ++k) d[k] = narrow_bits(t[k]);
}

/// float32 -> float16 bits, round to nearest even (Eigen::half's conversion, as c10::Half's).
inline std::uint16_t narrow_bits_f16(float f) { return std::bit_cast<std::uint16_t>(Eigen::half(f)); }

/// store_narrow for float16: vcvtps2ph (round to nearest even) where available.
template <class P>
inline void store_narrow_f16(std::uint16_t* d, const P& g) {
  constexpr int L = Eigen::internal::unpacket_traits<P>::size;
#if defined(__AVX512F__)
  if constexpr (L == 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d),
                        _mm512_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
#endif
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (L == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
#endif
  alignas(64) float t[L];
  Eigen::internal::pstore(t, g);
  for (int k = 0; k < L; ++k) d[k] = narrow_bits_f16(t[k]);
}

/// dst[0, n) = src[0, n) narrowed to bf16, a packet at a time (store_narrow).
inline void narrow_block(const float* src, std::int64_t n, Eigen::bfloat16* dst) {
  using namespace Eigen::internal;
  using P = packet_traits<float>::type;
  constexpr std::int64_t L = packet_traits<float>::size;
  auto* d = reinterpret_cast<std::uint16_t*>(dst);
  std::int64_t i = 0;
  for (; i + L <= n; i += L) store_narrow(d + i, ploadu<P>(src + i));
  for (; i < n; ++i) d[i] = narrow_bits(src[i]);
}

}  // namespace detail

namespace detail {

/// Adds Σ e^d (and Σ e^d·d when WithT) over one block to s (t), d = max(x - m, diff_floor), and
/// stores e^d into `e` when Store (e may be x itself: each element is read before it is written).
/// One loop over the block in Eigen's packet math with two accumulators per sum (exp latency),
/// lane sums added in double per block. The next block is prefetched while this one is
/// exponentiated: the loop is exp-bound and the hardware prefetcher does not run ahead of it, so
/// without the hint the next block's max pass waits on memory (measured: 0.33 -> 0.24 ns per
/// float32 element on the test machine, AVX-512). NaN in x propagates into s (std::max order).
/// With Scaled, d = max(a·(x - m), diff_floor) (a temperature's 1/T, see the file comment).
template <class S, bool WithT, bool Store, bool Scaled = false, class Src = S>
inline void block_exp_sums(const Src* x, std::int64_t n, S m, double& s, double& t, S* e, S a = S(1)) {
  using namespace Eigen::internal;
  using P = typename packet_traits<S>::type;
  constexpr std::int64_t L = packet_traits<S>::size;
  const P pm = pset1<P>(m), pfloor = pset1<P>(diff_floor<S>);
  [[maybe_unused]] const P pa = pset1<P>(a);
  P s0 = pset1<P>(S(0)), s1 = s0, t0 = s0, t1 = s0;
  std::int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
#if defined(__GNUC__)
    for (std::int64_t k = 0; k < 2 * L; k += static_cast<std::int64_t>(64 / sizeof(Src)))
      __builtin_prefetch(x + i + block_size + k, 0, 3);
#endif
    P d0, d1;
    if constexpr (Scaled) {
      d0 = pmax(pmul(psub(load_packet<P>(x + i), pm), pa), pfloor);
      d1 = pmax(pmul(psub(load_packet<P>(x + i + L), pm), pa), pfloor);
    } else {
      d0 = pmax(psub(load_packet<P>(x + i), pm), pfloor);
      d1 = pmax(psub(load_packet<P>(x + i + L), pm), pfloor);
    }
    const P e0 = pexp(d0), e1 = pexp(d1);
    s0 = padd(s0, e0);
    s1 = padd(s1, e1);
    if constexpr (WithT) {
      t0 = pmadd(e0, d0, t0);
      t1 = pmadd(e1, d1, t1);
    }
    if constexpr (Store) {
      pstoreu(e + i, e0);
      pstoreu(e + i + L, e1);
    }
  }
  S ss = predux(padd(s0, s1)), tt = WithT ? predux(padd(t0, t1)) : S(0);
  for (; i < n; ++i) {
    const S xi = widen(x[i]);
    const S d = Scaled ? std::max((xi - m) * a, diff_floor<S>) : std::max(xi - m, diff_floor<S>);
    const S ed = std::exp(d);
    ss += ed;
    if constexpr (WithT) tt += ed * d;
    if constexpr (Store) e[i] = ed;
  }
  s += static_cast<double>(ss);
  if constexpr (WithT) t += static_cast<double>(tt);
}

/// max of x[0, n), n >= 1, in one packet loop with two accumulators (the max is exact in any order,
/// so this equals Eigen's maxCoeff on every row without NaN; with a NaN the result may or may not
/// be NaN, as with maxCoeff's fast path, and the caller catches NaN through its sums). At the small
/// rows of a short vocabulary (V = 64: four packets) Eigen's general redux cost ~15 ns per call,
/// about a fifth of the row's work.
template <class Src, class S = compute_of<Src>>
inline S packet_max(const Src* x, std::int64_t n) {
  using namespace Eigen::internal;
  using P = typename packet_traits<S>::type;
  constexpr std::int64_t L = packet_traits<S>::size;
  if (n < 2 * L) {
    S m = widen(x[0]);
    for (std::int64_t i = 1; i < n; ++i) m = widen(x[i]) > m ? widen(x[i]) : m;
    return m;
  }
  P m0 = load_packet<P>(x), m1 = load_packet<P>(x + L);
  std::int64_t i = 2 * L;
  for (; i + 2 * L <= n; i += 2 * L) {
    m0 = pmax(m0, load_packet<P>(x + i));
    m1 = pmax(m1, load_packet<P>(x + i + L));
  }
  if (i + L <= n) {
    m0 = pmax(m0, load_packet<P>(x + i));
    i += L;
  }
  S m = predux_max(pmax(m0, m1));
  for (; i < n; ++i) m = widen(x[i]) > m ? widen(x[i]) : m;
  return m;
}

/// The online max/sum over a row (see reduce_row); with Store, also e^{x - m_b} into `e` and the
/// running max m_b each block b was exponentiated against into `block_max` (-inf: not stored).
template <class S, bool WithT, bool Store, bool Scaled = false, class Src = S>
row_stats<S> reduce_row_impl(const Src* row, std::int64_t vocab, S* e, S* block_max, double inv_t = 1.0) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>);
  static_assert(std::is_same_v<Src, S> || (is_16bit<Src> && std::is_same_v<S, float>));
  using A = array_t<S>;
  constexpr S neg_inf = -std::numeric_limits<S>::infinity();
  constexpr S nan = std::numeric_limits<S>::quiet_NaN();
  S m = neg_inf;
  double s = 0.0, t = 0.0;
  for (std::int64_t b = 0, blk_i = 0; b < vocab; b += block_size, ++blk_i) {
    const Eigen::Index n = static_cast<Eigen::Index>(std::min(block_size, vocab - b));
    // The fast max (half the cost of maxCoeff<PropagateNaN>): a NaN is caught through s below.
    const S bm = packet_max(row + b, static_cast<std::int64_t>(n));
    if (bm > m) {
      if (s > 0.0) {
        // in the scaled units of d: a·(m - m')
        const double delta = Scaled ? (static_cast<double>(m) - static_cast<double>(bm)) * inv_t
                                    : static_cast<double>(m) - static_cast<double>(bm);
        const double c = std::exp(delta);
        t = c * (t + delta * s);
        s *= c;
      }
      m = bm;
    }
    if constexpr (Store) block_max[blk_i] = std::isfinite(m) ? m : neg_inf;
    if (!std::isfinite(m)) {  // only -inf so far (or +inf: the result is m)
      bool has_nan = false;
      if constexpr (is_16bit<Src>) {
        for (Eigen::Index i = 0; i < n; ++i) has_nan = has_nan || std::isnan(widen(row[b + i]));
      } else {
        has_nan = Eigen::Map<const A>(row + b, n).hasNaN();
      }
      if (has_nan) return {nan, nan, nan, inv_t};
      continue;
    }
    block_exp_sums<S, WithT, Store, Scaled, Src>(row + b, n, m, s, t, Store ? e + b : nullptr, static_cast<S>(inv_t));
  }
  if (std::isnan(s) || std::isnan(t)) return {nan, nan, nan, inv_t};
  if (!std::isfinite(m)) return {m, 0.0, 0.0, inv_t};
  return {m, std::log(s), t / s, inv_t};
}

}  // namespace detail

/// One pass over a row: the online max/sum (m, s, t) with the rescaling s' = s·e^{m-m'},
/// t' = e^{m-m'}(t + (m-m')·s) when a block raises the running max. inv_t = 1/T: the statistics
/// of x/T (file comment); 1 runs the unscaled loop. A bfloat16 row gives the float32 statistics of its
/// widened values, equal bit for bit to reduce_row over a float32 copy of the row.
template <class Src, class S = compute_of<Src>>
row_stats<S> reduce_row(const Src* row, std::int64_t vocab, double inv_t = 1.0) {
  if (inv_t != 1.0) return detail::reduce_row_impl<S, true, false, true, Src>(row, vocab, nullptr, nullptr, inv_t);
  return detail::reduce_row_impl<S, true, false, false, Src>(row, vocab, nullptr, nullptr);
}

/// Blocks per row of `vocab` logits (the length of reduce_row_keep's block_max).
inline std::int64_t blocks_per_row(std::int64_t vocab) { return (vocab + block_size - 1) / block_size; }

/// reduce_row that also keeps its exponentials: e[v] = e^{a·(x_v - block_max[v / block_size])} (e may
/// be row: the row is then overwritten), so a backward of the form α·p − c needs no second exp
/// (write_row_backward_kept). block_max has blocks_per_row(vocab) entries. Without
/// `with_entropy` the sum t is skipped (t_over_s and entropy() are then 0). inv_t = a = 1/T.
template <class S>
row_stats<S> reduce_row_keep(const S* row, std::int64_t vocab, S* e, S* block_max, bool with_entropy,
                             double inv_t = 1.0) {
  if (inv_t != 1.0)
    return with_entropy ? detail::reduce_row_impl<S, true, true, true>(row, vocab, e, block_max, inv_t)
                        : detail::reduce_row_impl<S, false, true, true>(row, vocab, e, block_max, inv_t);
  return with_entropy ? detail::reduce_row_impl<S, true, true>(row, vocab, e, block_max)
                      : detail::reduce_row_impl<S, false, true>(row, vocab, e, block_max);
}

/// Whether the first maximum of a row is at `y` (torch.argmax's choice among ties), given the row's
/// max m from reduce_row; rows without a finite or -inf max (NaN, where argmax is undefined across
/// backends) give false. Reads x[0, y) only when x[y] is the max.
template <class Src>
bool first_argmax_is(const Src* x, std::int64_t y, compute_of<Src> m) {
  using detail::widen;
  if (std::isnan(m) || !(widen(x[y]) == m)) return false;
  for (std::int64_t v = 0; v < y; ++v)
    if (widen(x[v]) == m) return false;
  return true;
}

/// Forward over rows: any of the outputs may be null. labels (null: no log-probs, no hits) index
/// each row; a label equal to ignore_index gives log-prob 0 and hit 0. Labels must be in [0, vocab)
/// otherwise. argmax_hit[r] is 1 where the row's first argmax is its label (first_argmax_is).
/// inv_temperature = 1/T: the statistics of logits/T (the argmax is the same); 1: none. bfloat16
/// logits (Src = Eigen::bfloat16) are read natively and give the float32 results of their widened values.
template <class Src>
void logits_forward(const Src* logits, std::int64_t rows, std::int64_t vocab, const std::int64_t* labels,
                    std::int64_t ignore_index, compute_of<Src>* lse, compute_of<Src>* logprob, compute_of<Src>* entropy,
                    compute_of<Src>* row_max = nullptr, double* row_log_s = nullptr,
                    compute_of<Src>* argmax_hit = nullptr, double inv_temperature = 1.0) {
  using S = compute_of<Src>;
  parallel_rows(rows, vocab, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      const Src* x = logits + r * vocab;
      const row_stats<S> st = reduce_row(x, vocab, inv_temperature);
      if (lse) lse[r] = static_cast<S>(st.logsumexp());
      if (entropy) entropy[r] = static_cast<S>(st.entropy());
      if (row_max) row_max[r] = st.m;
      if (row_log_s) row_log_s[r] = st.log_s;
      if (logprob && labels) {
        const std::int64_t y = labels[r];
        if (y == ignore_index)
          logprob[r] = S(0);
        else if (st.finite())
          logprob[r] = static_cast<S>(st.logp(detail::widen(x[y])));  // a·(x_y - m) - log s, exact near the max
        else
          logprob[r] = detail::widen(x[y]) - st.m;  // -inf row: NaN, as the generic path; +inf: -inf or NaN
      }
      if (argmax_hit && labels) {
        const std::int64_t y = labels[r];
        argmax_hit[r] = y != ignore_index && first_argmax_is(x, y, st.m) ? S(1) : S(0);
      }
    }
  });
}

/// Per-row coefficients of the backward form
///   out[v] = p_v·(alpha + beta·log p_v) + d·([v = y] − p_v) − b·[v = y] − c.
/// d is the upstream gradient of log p_y (d log p_y/dx = onehot − p): it is kept apart so that the
/// label column is computed as p_y·(alpha + beta·log p_y) + d·(1 − p_y), without the cancellation
/// of p_y·(alpha − d) + d (exactly 0 when p_y = 1 and alpha = 0, e.g. at V = 1).
struct backward_coefficients {
  double alpha = 0.0;
  double beta = 0.0;
  double b = 0.0;
  double c = 0.0;
  double d = 0.0;
};

/// The label column of the backward form when d != 0: p_y·(alpha + beta·log p_y) + d·(1 − p_y) − b − c,
/// in double, with log p_y = a·(x_y − m) − log s (row_stats::logp).
template <class S>
double label_gradient(S x_label, const row_stats<S>& st, const backward_coefficients& k) {
  const double logp = std::max(st.logp(x_label), static_cast<double>(detail::diff_floor<S>));
  const double p = std::exp(logp);
  return p * (k.alpha + k.beta * logp) + k.d * (1.0 - p) - k.b - k.c;
}

namespace detail {
/// The chain rule of a temperature: coefficients of the gradient w.r.t. z = a·x, times a = dz/dx.
inline backward_coefficients times(const backward_coefficients& k, double a) {
  return {k.alpha * a, k.beta * a, k.b * a, k.c * a, k.d * a};
}
}  // namespace detail

/// Writes out[v] = p_v·(alpha + beta·log p_v) + d·([v = label] − p_v) − b·[v = label] − c for one
/// row whose statistics are known; `out` may be `row` itself (each element is read before it is
/// written). -inf logits get −c (p = 0, and p·log p := 0). With a temperature (st.inv_t = a ≠ 1)
/// p = softmax(a·x), the coefficients are those of the gradient w.r.t. a·x, and the row written is
/// a times that (the gradient w.r.t. x).
template <class S>
void write_row_backward(const S* row, std::int64_t vocab, const row_stats<S>& st, const backward_coefficients& k_z,
                        std::int64_t label, S* out) {
  using A = detail::array_t<S>;
  const bool scaled = st.inv_t != 1.0;
  const backward_coefficients k = scaled ? detail::times(k_z, st.inv_t) : k_z;
  const Eigen::Map<const A> x(row, static_cast<Eigen::Index>(vocab));
  Eigen::Map<A> o(out, static_cast<Eigen::Index>(vocab));
  const S alpha = static_cast<S>(k.alpha), beta = static_cast<S>(k.beta), c = static_cast<S>(k.c);
  if (!st.finite()) {
    // No finite row max: p is not a distribution over finite logits; NaN like the generic path.
    o.setConstant(std::numeric_limits<S>::quiet_NaN());
    return;
  }
  const S m = st.m;
  const S log_s = static_cast<S>(st.log_s);
  const bool has_label = label >= 0 && label < vocab;
  // The label column with d, from the row's own logit (read before the row may be overwritten).
  const double label_value = has_label && k.d != 0.0 ? label_gradient(row[label], st, k) : 0.0;
  const S a = static_cast<S>(k.alpha - k.d);  // every column's p coefficient: alpha − d
  // log p = (x - m) - log s: x - m first keeps precision at large |x|. A -inf logit gives
  // e^{-inf} = 0 (log p clamped first where it is multiplied), so p = 0 and p·log p = 0 there.
  if (scaled) {
    const S at = static_cast<S>(st.inv_t);
    if (k.beta == 0.0) {
      o = (k.d == 0.0 ? alpha : a) * ((x - m) * at - log_s).exp() - c;
    } else {
      const auto logp = ((x - m) * at - log_s).max(detail::diff_floor<S>);
      o = logp.exp() * ((k.d == 0.0 ? alpha : a) + beta * logp) - c;
    }
  } else if (k.beta == 0.0) {
    o = (k.d == 0.0 ? alpha : a) * ((x - m) - log_s).exp() - c;
  } else {
    const auto logp = ((x - m) - log_s).max(detail::diff_floor<S>);
    o = logp.exp() * ((k.d == 0.0 ? alpha : a) + beta * logp) - c;
  }
  if (has_label) {
    if (k.d != 0.0)
      out[label] = static_cast<S>(label_value);
    else
      out[label] -= static_cast<S>(k.b);
  }
}

/// write_row_backward for a bfloat16 (or float16: H = Eigen::half) row into a gradient row of the
/// same type, straight from the row's statistics (reduce_row of the 16-bit row) in one pass: each
/// packet of logits is widened in registers, its float32 gradient computed as write_row_backward
/// computes it over a float32 copy of the row, and narrowed (round to nearest even) in registers.
/// `out` may be `row`.
template <class H>
void write_row_backward_16(const H* row, std::int64_t vocab, const row_stats<float>& st,
                           const backward_coefficients& k_z, std::int64_t label, H* out) {
  static_assert(detail::is_16bit<H>);
  using namespace Eigen::internal;
  using P = packet_traits<float>::type;
  constexpr std::int64_t L = packet_traits<float>::size;
  auto* o = reinterpret_cast<std::uint16_t*>(out);
  const auto narrow1 = [](float f) { return detail::is_bf16<H> ? detail::narrow_bits(f) : detail::narrow_bits_f16(f); };
  const auto narrow_packet = [o](std::int64_t i, const P& g) {
    if constexpr (detail::is_bf16<H>)
      detail::store_narrow(o + i, g);
    else
      detail::store_narrow_f16(o + i, g);
  };
  if (!st.finite()) {  // no finite row max: NaN, as write_row_backward
    std::fill(o, o + vocab, narrow1(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  const bool scaled = st.inv_t != 1.0;
  const backward_coefficients k = scaled ? detail::times(k_z, st.inv_t) : k_z;
  const bool has_label = label >= 0 && label < vocab;
  const float x_label = has_label ? detail::widen(row[label]) : 0.0f;
  const double label_value = has_label && k.d != 0.0 ? label_gradient(x_label, st, k) : 0.0;
  // every column's p coefficient: alpha, or alpha − d with d (write_row_backward)
  const float a = static_cast<float>(k.d == 0.0 ? k.alpha : k.alpha - k.d);
  const float beta = static_cast<float>(k.beta), c = static_cast<float>(k.c), m = st.m;
  const float log_s = static_cast<float>(st.log_s), at = static_cast<float>(st.inv_t);
  constexpr float lo = detail::diff_floor<float>;
  // log p = a·(x − m) − log s (x − m first); -inf logits give p = 0 (log p clamped where multiplied).
  const auto scalar = [&](float x) {
    const float z = (scaled ? (x - m) * at : x - m) - log_s;
    if (k.beta == 0.0) return a * std::exp(z) - c;
    const float lz = std::max(z, lo);
    return std::exp(lz) * (a + beta * lz) - c;
  };
  const auto run = [&](auto scaled_c, auto beta_c) {
    constexpr bool Scaled = decltype(scaled_c)::value, Beta = decltype(beta_c)::value;
    const P pm = pset1<P>(m), pls = pset1<P>(log_s), pat = pset1<P>(at), pa = pset1<P>(a), pb = pset1<P>(beta),
            pc = pset1<P>(c), plo = pset1<P>(lo);
    std::int64_t i = 0;
    for (; i + L <= vocab; i += L) {
      P z = psub(detail::load_packet<P>(row + i), pm);
      if constexpr (Scaled) z = pmul(z, pat);
      z = psub(z, pls);
      if constexpr (Beta) {
        z = pmax(z, plo);
        narrow_packet(i, psub(pmul(pexp(z), padd(pa, pmul(pb, z))), pc));
      } else {
        narrow_packet(i, psub(pmul(pa, pexp(z)), pc));
      }
    }
    for (; i < vocab; ++i) o[i] = narrow1(scalar(detail::widen(row[i])));
  };
  if (scaled)
    k.beta == 0.0 ? run(std::true_type{}, std::false_type{}) : run(std::true_type{}, std::true_type{});
  else
    k.beta == 0.0 ? run(std::false_type{}, std::false_type{}) : run(std::false_type{}, std::true_type{});
  if (has_label)
    o[label] = narrow1(k.d != 0.0 ? static_cast<float>(label_value) : scalar(x_label) - static_cast<float>(k.b));
}

/// write_row_backward for β = 0 from reduce_row_keep's exponentials: out[v] = α·p_v − b·[v = y] − c
/// with p_v = e[v]·e^{a·(m_b − m) − log s} (one multiply per element, no exp). `out` may be `e`.
/// With a temperature (st.inv_t = a ≠ 1) the chain rule's a is applied as in write_row_backward.
template <class S>
void write_row_backward_kept(const S* e, std::int64_t vocab, const row_stats<S>& st, const S* block_max,
                             const backward_coefficients& k_z, std::int64_t label, S* out) {
  using A = detail::array_t<S>;
  const bool scaled = st.inv_t != 1.0;
  const backward_coefficients k = scaled ? detail::times(k_z, st.inv_t) : k_z;
  const S c = static_cast<S>(k.c);
  if (!st.finite()) {
    Eigen::Map<A>(out, static_cast<Eigen::Index>(vocab)).setConstant(std::numeric_limits<S>::quiet_NaN());
    return;
  }
  const bool has_label = label >= 0 && label < vocab;
  // The label column with d (see write_row_backward), from its kept exponential before out overwrites it:
  // x_y − m = log e[y] + (m_b − m) for the block max m_b it was exponentiated against.
  double label_value = 0.0;
  if (has_label && k.d != 0.0) {
    const S mb = block_max[label / block_size];
    if (scaled) {
      // log p_y = log e[y] + a·(m_b − m) − log s, straight from the kept exponential.
      const double logp = std::isfinite(mb)
                              ? std::log(static_cast<double>(e[label])) +
                                    (static_cast<double>(mb) - static_cast<double>(st.m)) * st.inv_t - st.log_s
                              : -std::numeric_limits<double>::infinity();
      const double p = std::exp(std::max(logp, static_cast<double>(detail::diff_floor<S>)));
      label_value = p * k.alpha + k.d * (1.0 - p) - k.b - k.c;  // β = 0 here
    } else {
      const S x_minus_m = std::isfinite(mb) ? static_cast<S>(std::log(static_cast<double>(e[label])) +
                                                             (static_cast<double>(mb) - static_cast<double>(st.m)))
                                            : -std::numeric_limits<S>::infinity();
      label_value = label_gradient(static_cast<S>(x_minus_m + st.m), st, k);
    }
  }
  const double alpha = k.alpha - k.d;  // every column's p coefficient
  for (std::int64_t b = 0, blk_i = 0; b < vocab; b += block_size, ++blk_i) {
    const Eigen::Index n = static_cast<Eigen::Index>(std::min(block_size, vocab - b));
    Eigen::Map<A> o(out + b, n);
    const S mb = block_max[blk_i];
    if (!std::isfinite(mb)) {  // only -inf logits up to this block: p = 0 there
      o.setConstant(-c);
      continue;
    }
    // p = e^{a(x - m_b)}·e^{a(m_b - m) - log s}; the scale in double, exact up to the final rounding.
    const double shift = static_cast<double>(mb) - static_cast<double>(st.m);
    const S scale = static_cast<S>(alpha * std::exp((scaled ? shift * st.inv_t : shift) - st.log_s));
    o = Eigen::Map<const A>(e + b, n) * scale - c;
  }
  if (has_label) {
    if (k.d != 0.0)
      out[label] = static_cast<S>(label_value);
    else
      out[label] -= static_cast<S>(k.b);
  }
}

/// Coefficients of sft_loss_backward's row gradient (the SFT cross-entropy with its options):
///   weight·[(f + 2z·lse)·p − f·(1−ε)·onehot(y) − f·ε/V],   f = sg(p_y) with DFT (arXiv:2508.05629
/// eq. 8; the z-loss term is not weighted by it), f = 1 otherwise; weight = d loss / d ℓ_row.
template <class S>
backward_coefficients cross_entropy_coefficients(const row_stats<S>& st, S x_label, std::int64_t vocab, double weight,
                                                 double label_smoothing, double z_loss, bool dft) {
  const double f = dft ? std::exp(st.logp(x_label)) : 1.0;
  const double z_term = z_loss > 0.0 ? 2.0 * z_loss * st.logsumexp() : 0.0;
  return {weight * (f + z_term), 0.0, weight * f * (1.0 - label_smoothing),
          weight * f * label_smoothing / static_cast<double>(vocab)};
}

/// Backward over rows: out[r, v] = p_rv·(alpha_r + beta_r·log p_rv) − b_r·[v = y_r] − c_r, with the
/// coefficients from coeff(r, row_stats) (labels may be null: no one-hot term). `out` may equal
/// `logits` (in-place gradient). One read for the statistics and one read + write for the gradient,
/// row by row, so the row is still in cache for the second pass; into a separate buffer, a β = 0
/// gradient reuses the statistics pass's exponentials (one exp per logit instead of two).
template <class S, class Coefficients>
void logits_backward(const S* logits, std::int64_t rows, std::int64_t vocab, const std::int64_t* labels,
                     Coefficients&& coeff, S* out) {
  parallel_rows(rows, vocab, [&](std::int64_t begin, std::int64_t end) {
    std::vector<S> block_max(static_cast<std::size_t>(blocks_per_row(vocab)));
    for (std::int64_t r = begin; r < end; ++r) {
      const S* x = logits + r * vocab;
      S* o = out + r * vocab;
      const std::int64_t label = labels ? labels[r] : std::int64_t{-1};
      if (o == x) {  // in place: the logits are needed again, so the exps are recomputed
        const row_stats<S> st = reduce_row(x, vocab);
        write_row_backward(x, vocab, st, coeff(r, st), label, o);
        continue;
      }
      // Into a separate buffer: the statistics pass keeps its exponentials there, and a β = 0
      // form (cross-entropy, log-prob, logsumexp gradients) rescales them without a second exp.
      const row_stats<S> st = reduce_row_keep(x, vocab, o, block_max.data(), true);
      const backward_coefficients k = coeff(r, st);
      if (k.beta == 0.0)
        write_row_backward_kept(o, vocab, st, block_max.data(), k, label, o);
      else
        write_row_backward(x, vocab, st, k, label, o);
    }
  });
}

/// Options of the fused cross-entropy (PyTorch cross_entropy semantics plus PaLM's z-loss).
struct cross_entropy_options {
  std::int64_t ignore_index = -100;
  double label_smoothing = 0.0;  ///< ε: (1-ε)·nll + ε·(lse - mean_v x_v)
  double z_loss = 0.0;           ///< z·lse² (PaLM, arXiv:2204.02311 §5)
};

/// Fused cross-entropy forward + backward in one call (Liger's scheme): per-row loss
///   ℓ_r = (1-ε)(lse - x_y) + ε(lse - mean_v x_v) + z·lse²   (0 where y = ignore_index)
/// into `loss` (nullable), and, when `grad` is not null,
///   grad[r, :] = grad_scale·((1 + 2z·lse)·p - (1-ε)·onehot(y) - ε/V)   (0 at ignored rows)
/// where grad_scale is d loss / d ℓ_r (e.g. 1/num_valid for a token mean). grad may equal logits:
/// the gradient then overwrites them in place. Returns the number of non-ignored rows.
template <class S>
std::int64_t cross_entropy_forward_backward(const S* logits, std::int64_t rows, std::int64_t vocab,
                                            const std::int64_t* labels, const cross_entropy_options& opt, S* loss,
                                            S* grad, double grad_scale) {
  using A = detail::array_t<S>;
  std::atomic<std::int64_t> valid{0};
  const double eps = opt.label_smoothing, z = opt.z_loss;
  parallel_rows(rows, vocab, [&](std::int64_t begin, std::int64_t end) {
    std::int64_t local_valid = 0;
    std::vector<S> block_max(static_cast<std::size_t>(blocks_per_row(vocab)));
    for (std::int64_t r = begin; r < end; ++r) {
      const S* x = logits + r * vocab;
      S* g = grad ? grad + r * vocab : nullptr;
      const std::int64_t y = labels[r];
      if (y == opt.ignore_index) {
        if (loss) loss[r] = S(0);
        if (g) Eigen::Map<A>(g, static_cast<Eigen::Index>(vocab)).setZero();
        continue;
      }
      ++local_valid;
      // Read before the row may be overwritten by its exponentials (g == x in place).
      const S x_label = x[y];
      double sx = 0.0;
      if (loss && eps > 0.0)  // blockwise sum in double (as reduce_row) for mean_v x_v
        for (std::int64_t b = 0; b < vocab; b += block_size)
          sx += static_cast<double>(
              Eigen::Map<const A>(x + b, static_cast<Eigen::Index>(std::min(block_size, vocab - b))).sum());
      // With a gradient the exponentials of the statistics pass are kept in g: one exp per logit.
      const row_stats<S> st = g ? reduce_row_keep(x, vocab, g, block_max.data(), false) : reduce_row(x, vocab);
      const double lse = st.logsumexp();
      if (loss) {
        const double nll =
            st.finite() ? st.log_s - static_cast<double>(x_label - st.m) : lse - static_cast<double>(x_label);
        double l = (1.0 - eps) * nll + z * lse * lse;
        if (eps > 0.0) l += eps * (lse - sx / static_cast<double>(vocab));
        loss[r] = static_cast<S>(l);
      }
      if (g) {
        const backward_coefficients k{grad_scale * (1.0 + 2.0 * z * lse), 0.0, grad_scale * (1.0 - eps),
                                      grad_scale * eps / static_cast<double>(vocab)};
        write_row_backward_kept(g, vocab, st, block_max.data(), k, y, g);
      }
    }
    valid.fetch_add(local_valid, std::memory_order_relaxed);
  });
  return valid.load();
}

}  // namespace posttrain::kernels
