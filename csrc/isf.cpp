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

// A pooled sample with its lengths beside it: passes read the pool sequentially instead of
// jumping into the length columns (which dominates the run time at a million samples).
struct Item {
  int64_t index;
  int32_t vit;
  int32_t tokens;
};

}  // namespace

Groups isf(const Lengths& len, int32_t vit_cap, int32_t token_cap, int64_t token_threshold, int iterations,
           uint64_t seed, Oversize policy) {
  Groups out;
  std::vector<Item> pool;
  for (int64_t i : split_oversize(len, vit_cap, token_cap, policy, out)) pool.push_back({i, len.vit[i], len.tokens[i]});
  std::vector<Item> rest;
  for (int pass = 0; pass < iterations && !pool.empty(); ++pass) {
    SplitMix64 rng(pass == 0 ? seed : seed + static_cast<uint64_t>(pass - 1));
    rng.shuffle(pool);
    const bool last = pass == iterations - 1;
    rest.clear();
    // Next-fit; a group [open, k) is decided when it closes: kept (to `out`) or pooled (to `rest`).
    size_t open = 0;
    int64_t v = 0, t = 0;
    auto close = [&](size_t end) {
      const bool keep = last || v == vit_cap || t >= token_threshold;
      for (size_t k = open; k < end; ++k) {
        if (keep) {
          out.indices.push_back(pool[k].index);
        } else {
          rest.push_back(pool[k]);
        }
      }
      if (keep) out.close_group();
    };
    for (size_t k = 0; k < pool.size(); ++k) {
      if (k > open && (v + pool[k].vit > vit_cap || t + pool[k].tokens > token_cap)) {
        close(k);
        open = k;
        v = t = 0;
      }
      v += pool[k].vit;
      t += pool[k].tokens;
    }
    close(pool.size());
    pool.swap(rest);
  }
  return out;
}

}  // namespace omnibal
