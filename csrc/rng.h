// SplitMix64: the one random stream shared by the C++ core and the pure-Python reference
// (omnibal_pl/balance/rng.py), so both produce identical shuffles for the same seed.
#pragma once
#include <cstdint>
#include <vector>

namespace omnibal {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t next() {
    state_ += 0x9E3779B97F4A7C15ULL;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  // Integer in [0, n) by multiply-high (Lemire): no division, and the bias (< n / 2^64) is irrelevant here.
  uint64_t below(uint64_t n) { return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64); }

  // Fisher-Yates from the back: for i = n-1 .. 1, swap v[i] with v[below(i + 1)].
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) {
      size_t j = static_cast<size_t>(below(i));
      std::swap(v[i - 1], v[j]);
    }
  }

 private:
  uint64_t state_;
};

}  // namespace omnibal
