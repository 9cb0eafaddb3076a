// benchmarks/timing.hpp — the timing loop every benchmark file's cases share.
//
// Google Benchmark prints its own per-case times; each file's summary table also needs the mean
// seconds per call of its cases by name (to divide by the floor or the baseline measured in the
// same run), so every case runs its body through timed(), which records that mean in the file's
// own map (a file's summary prints only when its own map is non-empty).
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace posttrain_bench {

/// Runs body once per benchmark iteration and stores its mean wall-clock seconds in into[name].
template <class F>
void timed(benchmark::State& state, std::map<std::string, double>& into, const std::string& name, F&& body) {
  double total = 0.0;
  std::int64_t n = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    body();
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++n;
  }
  into[name] = total / static_cast<double>(std::max<std::int64_t>(n, 1));
}

}  // namespace posttrain_bench
