// LLaMA-Factory's sequence packing, reimplemented as a baseline: a greedy knapsack on token length.
// Samples are sorted by tokens (ascending, stable); each knapsack starts empty with `token_cap` free
// tokens and repeatedly takes the longest unused sample that still fits (the binary search for the
// largest length <= remaining), until none fits; then the next knapsack opens. Tiles are not looked at.
// The published code pops from a sorted Python list (quadratic); here "longest unused at or before a
// sorted position" is a union-find over sorted positions with path compression, so the whole packing is
// O(n log n) for the sort plus near-constant work per sample.
#include <algorithm>
#include <limits>
#include <numeric>

#include "grouping.h"
#include "rng.h"

namespace omnibal {

Groups greedy_knapsack(const Lengths& len, int32_t token_cap, uint64_t seed, Oversize policy) {
  Groups out;
  std::vector<int64_t> order =
      split_oversize(len, std::numeric_limits<int32_t>::max(), token_cap, policy, out);
  // A seeded shuffle first, so samples of equal length are taken in a different order per seed.
  SplitMix64(seed).shuffle(order);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len.tokens[a] < len.tokens[b]; });
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<int32_t> sorted_tokens(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) sorted_tokens[k] = len.tokens[order[k]];

  // free_at[p + 1]: the largest unused sorted position <= p, plus one (0: none). Path-compressed.
  std::vector<int64_t> free_at(static_cast<size_t>(n) + 1);
  std::iota(free_at.begin(), free_at.end(), 0);
  auto find = [&](int64_t p) {
    int64_t root = p;
    while (free_at[root] != root) root = free_at[root];
    while (free_at[p] != root) {
      const int64_t next = free_at[p];
      free_at[p] = root;
      p = next;
    }
    return root;
  };

  int64_t left = n;
  while (left > 0) {
    int64_t room = token_cap;
    while (true) {
      // Sorted positions with tokens <= room are [0, fit); take the last unused one.
      const int64_t fit = std::upper_bound(sorted_tokens.begin(), sorted_tokens.end(), room) - sorted_tokens.begin();
      const int64_t slot = find(fit);
      if (slot == 0) break;
      free_at[slot] = slot - 1;  // used: look-ups continue to its left
      --left;
      room -= sorted_tokens[slot - 1];
      out.indices.push_back(order[slot - 1]);
    }
    out.close_group();
  }
  return out;
}

}  // namespace omnibal
