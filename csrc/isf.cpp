// ISF (iterative sampling and filtering), OmniBal's grouping, reproduced step by step:
//   1. shuffle, then next-fit: a sample joins the open group unless the group's tile sum would pass
//      vit_cap or its token sum would pass token_cap; then the group closes and a new one opens with it;
//   2. keep groups whose tile sum equals vit_cap or whose token sum reaches token_threshold;
//   3. pool the other groups' samples, reshuffle, regroup; repeat (iterations passes in all);
//   4. append the last pass's groups as they are.
// Pass 0 shuffles with `seed`, pass k >= 1 with `seed + k - 1` (the published seeding).
// Unlike the published code, no sample is dropped: oversize samples follow the policy and the
// last open group is always closed.
#include "grouping.h"
#include "rng.h"

namespace omnibal {

std::vector<int64_t> split_oversize(const Lengths& len, int32_t vit_cap, int32_t token_cap, Oversize policy,
                                    Groups& out) {
  std::vector<int64_t> fit;
  fit.reserve(static_cast<size_t>(len.n));
  for (int64_t i = 0; i < len.n; ++i) {
    if (len.vit[i] <= vit_cap && len.tokens[i] <= token_cap) {
      fit.push_back(i);
      continue;
    }
    if (policy == Oversize::kError) {
      throw OversizeError("sample " + std::to_string(i) + " has " + std::to_string(len.vit[i]) + " tiles and " +
                          std::to_string(len.tokens[i]) + " tokens, over the caps (" + std::to_string(vit_cap) +
                          " tiles, " + std::to_string(token_cap) +
                          " tokens); raise the caps or use oversize=solo to give it a group of its own");
    }
    out.indices.push_back(i);
    out.close_group();
    ++out.oversize;
  }
  return fit;
}

namespace {

// Next-fit over `order`; appends the groups to `out`.
void next_fit(const Lengths& len, const std::vector<int64_t>& order, int32_t vit_cap, int32_t token_cap,
              Groups& out) {
  int64_t v = 0, t = 0;
  bool open = false;
  for (int64_t i : order) {
    if (open && (v + len.vit[i] > vit_cap || t + len.tokens[i] > token_cap)) {
      out.close_group();
      v = t = 0;
    }
    out.indices.push_back(i);
    v += len.vit[i];
    t += len.tokens[i];
    open = true;
  }
  if (open) out.close_group();
}

}  // namespace

Groups isf(const Lengths& len, int32_t vit_cap, int32_t token_cap, int64_t token_threshold, int iterations,
           uint64_t seed, Oversize policy) {
  Groups out;
  std::vector<int64_t> pool = split_oversize(len, vit_cap, token_cap, policy, out);
  for (int pass = 0; pass < iterations && !pool.empty(); ++pass) {
    SplitMix64 rng(pass == 0 ? seed : seed + static_cast<uint64_t>(pass - 1));
    rng.shuffle(pool);
    Groups round;
    next_fit(len, pool, vit_cap, token_cap, round);
    const bool last = pass == iterations - 1;
    std::vector<int64_t> rest;
    for (size_t g = 0; g < round.size(); ++g) {
      int64_t v = 0, t = 0;
      for (int64_t k = round.offsets[g]; k < round.offsets[g + 1]; ++k) {
        v += len.vit[round.indices[k]];
        t += len.tokens[round.indices[k]];
      }
      const bool keep = last || v == vit_cap || t >= token_threshold;
      for (int64_t k = round.offsets[g]; k < round.offsets[g + 1]; ++k) {
        (keep ? out.indices : rest).push_back(round.indices[k]);
      }
      if (keep) out.close_group();
    }
    pool.swap(rest);
  }
  return out;
}

}  // namespace omnibal
