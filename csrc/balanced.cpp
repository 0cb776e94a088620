// `balanced`: our grouping. Every group is filled to the vision cap exactly (in units of `vit_quantum`) and
// to the token cap as closely as the data allow, so groups are near-equal in both dimensions and any DP
// ranks that receive groups of one step carry near-equal work.
//
// Vision units: a sample of `vit` vision counts (tiles for InternVL/LLaVA, merge blocks for Qwen2-VL) takes
// ceil(vit / vit_quantum) units and a group holds vit_cap / vit_quantum (rounded down) units, so a full group
// never passes vit_cap and falls short of it by less than one quantum per sample. Quantum 1 is exact tiles
// (about 13 distinct counts); Qwen's hundreds of distinct block counts take a quantum of ~1/48 of a mean
// sample (~250 units per group instead of ~18 tiles; the scans below are linear in the units).
//
// Samples are bucketed by units and sorted by tokens inside a bucket. A group aims at `target` tokens:
// the token cap, or less when the unused samples carry fewer tokens per unit than the caps (the group's
// fair share of the tokens left), so the token-rich samples (text-only ones) last to the end. It starts
// from a random unused sample of a bucket drawn by drain weight (below; a new grouping per seed); then,
// while units remain, it either
//   - closes: takes, from the bucket of exactly the remaining units, the largest sample that fits
//     the remaining tokens, when that lands within `close_slack` of the aim (or nothing else fits);
//   - or grows: picks a unit count v at random, weighted by what is left of each bucket (so buckets
//     drain in proportion and the mix stays stable to the end), among counts whose leftover unit
//     remainder can still be filled exactly; then takes a sample of v units drawn uniformly among those
//     whose tokens leave a remainder that the remaining units can still fill.
// Samples are put in buckets by a stable counting sort on tokens: set-up O(n + largest token count).
// Inside a bucket, look-ups ("a sample with the largest tokens <= x", "a uniform unused one with tokens
// in [lo, hi]") count unused samples per distinct token count in a Fenwick tree (a few thousand entries
// at most, so it stays in cache however many samples there are: O(log distinct counts) per look-up),
// and answer with that token count; taking it takes the count's last unused sample. Samples of one bucket
// and token count are alike to the grouping (same units, same tokens) and lie in shuffled order, so the
// last unused one is a uniform draw among them, and a count's unused samples are always the first slots
// of its run: a take reads one sample index and keeps no per-sample bookkeeping (on 1.2M Qwen-style rows,
// the random reads of per-sample lists were a third of the grouping's time).
#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "grouping.h"
#include "rng.h"

namespace omnibal {
namespace {

// Unused samples per distinct token count of a bucket (ascending) as a Fenwick tree: counts and order
// statistics over the unused samples in O(log distinct counts).
class Fenwick {
 public:
  explicit Fenwick(const std::vector<int32_t>& counts) : tree_(counts.size() + 1, 0) {
    const size_t n = counts.size();
    for (size_t i = 1; i <= n; ++i) {
      tree_[i] += counts[i - 1];
      size_t up = i + (i & (~i + 1));
      if (up <= n) tree_[up] += tree_[i];
    }
    top_ = 1;
    while (top_ * 2 <= n) top_ *= 2;
  }
  // Unused samples among the first k token counts.
  int64_t prefix(size_t k) const {
    int64_t s = 0;
    for (; k > 0; k -= k & (~k + 1)) s += tree_[k];
    return s;
  }
  void remove(size_t value) {  // one sample of the value-th token count (0-based) is used
    for (size_t i = value + 1; i < tree_.size(); i += i & (~i + 1)) tree_[i] -= 1;
  }
  // 0-based token-count index holding the k-th unused sample (k >= 1, k <= unused count).
  size_t kth(int64_t k) const {
    size_t pos = 0;
    for (size_t step = top_; step > 0; step >>= 1) {
      if (pos + step < tree_.size() && tree_[pos + step] < k) {
        pos += step;
        k -= tree_[pos];
      }
    }
    return pos;
  }

 private:
  std::vector<int32_t> tree_;  // int32: half the cache footprint of int64
  size_t top_ = 1;
};

struct Bucket {
  std::vector<int64_t> items;   // sample indices, ascending tokens (equal tokens: in shuffled order)
  std::vector<int32_t> values;  // distinct token counts of the bucket, ascending
  // The slots of token count v start at start[v]; its unused ones are the first count[v] of them.
  std::vector<int64_t> start;
  std::vector<int32_t> count;
  Fenwick unused{{}};
  int64_t left = 0;
  int64_t first = 0, last = -1;  // smallest / largest token-count index with unused samples
  bool extremes_changed = false;  // the last take() changed min_tokens(), max_tokens() or emptied it

  void init(const std::vector<int32_t>& tokens) {  // tokens of items
    for (size_t k = 0; k < items.size(); ++k) {
      if (k == 0 || tokens[k] != tokens[k - 1]) {
        values.push_back(tokens[k]);
        start.push_back(static_cast<int64_t>(k));
        count.push_back(0);
      }
      ++count.back();
    }
    unused = Fenwick(count);
    left = static_cast<int64_t>(items.size());
    first = 0;
    last = static_cast<int64_t>(values.size()) - 1;
  }
  int64_t count_below(int64_t x) const {  // unused with tokens < x
    return unused.prefix(std::lower_bound(values.begin(), values.end(), x) - values.begin());
  }
  int64_t count_at_most(int64_t x) const {
    return unused.prefix(std::upper_bound(values.begin(), values.end(), x) - values.begin());
  }
  // Token-count index (into values) of the k-th unused item.
  int64_t kth_value(int64_t k) const { return static_cast<int64_t>(unused.kth(k)); }
  // Token-count index of the largest token count <= x with an unused item, or -1.
  int64_t largest_at_most(int64_t x) const {
    int64_t c = count_at_most(x);
    return c == 0 ? -1 : kth_value(c);
  }
  // Token-count index of an unused item drawn uniformly among those with tokens in [lo, hi], or -1.
  int64_t uniform_between(int64_t lo, int64_t hi, SplitMix64& rng) const {
    if (lo > hi) return -1;
    int64_t a = count_below(lo), b = count_at_most(hi);
    if (b <= a) return -1;
    return kth_value(a + 1 + static_cast<int64_t>(rng.below(static_cast<uint64_t>(b - a))));
  }
  // Weight of this bucket in a growing move: its size, sharpened by how much of it is left, so
  // buckets that closing moves drain faster (small tile counts) are spared by growing moves and all
  // buckets empty together; otherwise the pool ends with tile counts that cannot fill a group exactly.
  double drain_weight() const {
    const double frac = static_cast<double>(left) / static_cast<double>(items.size());
    const double f2 = frac * frac, f4 = f2 * f2;
    return static_cast<double>(left) * f4 * f4;
  }
  // Takes the last unused item of token count ``v`` (an index into values); returns its sample index.
  int64_t take(int64_t v) {
    // Once per sample, outside the look-up loops: a look-up bug becomes a Python IndexError, not a
    // read past the bucket or a sample taken twice.
    if (v < 0 || v >= static_cast<int64_t>(values.size()) || count[v] == 0)
      throw std::out_of_range("balanced: token count " + std::to_string(v) + " of a bucket of " +
                              std::to_string(values.size()) + " counts is outside it or has no unused sample");
    unused.remove(static_cast<size_t>(v));
    const int64_t slot = start[v] + --count[v];
    --left;
    // Items only ever leave, so the smallest / largest token count in use only moves inwards.
    const int64_t was_first = first, was_last = last;
    while (left > 0 && count[first] == 0) ++first;
    while (left > 0 && count[last] == 0) --last;
    extremes_changed = left == 0 || first != was_first || last != was_last;
    return items[slot];
  }
  int32_t min_tokens() const { return values[first]; }  // requires left > 0
  int32_t max_tokens() const { return values[last]; }   // requires left > 0
};

}  // namespace

Groups balanced(const Lengths& len, int32_t vit_cap, int32_t token_cap, int32_t vit_quantum, uint64_t seed,
                Oversize policy) {
  if (len.n > std::numeric_limits<int32_t>::max())  // slots within a bucket are int32
    throw std::invalid_argument("balanced groups at most 2^31 - 1 samples per call; split the data");
  if (vit_quantum < 1 || vit_quantum > vit_cap)
    throw std::invalid_argument("balanced: vit_quantum " + std::to_string(vit_quantum) + " must be in [1, vit_cap = " +
                                std::to_string(vit_cap) + "]");
  const int32_t unit_cap = vit_cap / vit_quantum;
  // Units of a sample within the caps: rounded up, so unit sums bound vision sums. Only when vit_cap is not a
  // multiple of the quantum can a sample's units pass unit_cap; it then fills a group alone, within vit_cap.
  auto units = [&](int64_t i) { return std::min((len.vit[i] + vit_quantum - 1) / vit_quantum, unit_cap); };
  Groups out;
  std::vector<int64_t> order = split_oversize(len, vit_cap, token_cap, policy, out);
  if (order.empty()) return out;
  out.indices.reserve(out.indices.size() + order.size());
  SplitMix64 rng(seed);
  rng.shuffle(order);

  int32_t vmax = 0;
  for (int64_t i : order) vmax = std::max(vmax, units(i));
  std::vector<Bucket> buckets(vmax + 1);
  {
    // Stable counting sort on tokens, then a stable split by units: every bucket is sorted by tokens,
    // and equal token counts keep their shuffled order (ties broken at random).
    int32_t tmax = 0;
    for (int64_t i : order) tmax = std::max(tmax, len.tokens[i]);
    std::vector<int64_t> at(static_cast<size_t>(tmax) + 2, 0), by_tokens(order.size());
    std::vector<int64_t> per_bucket(vmax + 1, 0);
    for (int64_t i : order) {
      ++at[len.tokens[i] + 1];
      ++per_bucket[units(i)];
    }
    std::partial_sum(at.begin(), at.end(), at.begin());
    for (int64_t i : order) by_tokens[at[len.tokens[i]]++] = i;
    for (int32_t v = 0; v <= vmax; ++v) buckets[v].items.reserve(per_bucket[v]);
    for (int64_t i : by_tokens) buckets[units(i)].items.push_back(i);
  }
  std::vector<double> drain(vmax + 1, 0.0);  // drain weight per bucket, 0 once empty (contiguous for the scans)
  std::vector<int32_t> tokens;  // of one bucket's items, while its look-ups are built
  for (int32_t v = 0; v <= vmax; ++v) {
    Bucket& b = buckets[v];
    tokens.resize(b.items.size());
    for (size_t k = 0; k < b.items.size(); ++k) tokens[k] = len.tokens[b.items[k]];
    b.init(tokens);
    if (b.left > 0) drain[v] = b.drain_weight();
  }

  // Token bounds of an exact fill: lo[r] / hi[r] = fewest / most tokens with which r units can be
  // filled from the unused samples (each bucket's current smallest / largest, counts ignored);
  // kNone where r units cannot be filled exactly.
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> lo(unit_cap + 1), hi(unit_cap + 1), bucket_min(vmax + 1), bucket_max(vmax + 1);
  int64_t bounds_upto = -1;  // lo/hi are valid for r <= bounds_upto; -1 once an extreme changed
  struct Extremes {
    int64_t units, min_tokens, max_tokens;
  };
  std::vector<Extremes> present;
  // lo/hi up to rmax, extending what is valid (a group's later moves need smaller r than its first).
  auto fill_bounds = [&](int64_t rmax) {
    if (rmax <= bounds_upto) return;
    if (bounds_upto < 0) {
      present.clear();  // non-empty buckets, ascending: the inner loop below reads them contiguously
      for (int32_t v = 1; v <= vmax; ++v) {
        if (buckets[v].left > 0) {
          bucket_min[v] = buckets[v].min_tokens();
          bucket_max[v] = buckets[v].max_tokens();
          present.push_back({v, bucket_min[v], bucket_max[v]});
        }
      }
      lo[0] = hi[0] = 0;
      bounds_upto = 0;
    }
    for (int64_t r = bounds_upto + 1; r <= rmax; ++r) {
      lo[r] = kNone;
      hi[r] = 0;
      for (const Extremes& e : present) {
        if (e.units > r) break;
        if (lo[r - e.units] == kNone) continue;
        lo[r] = std::min(lo[r], lo[r - e.units] + e.min_tokens);
        hi[r] = std::max(hi[r], hi[r - e.units] + e.max_tokens);
      }
    }
    bounds_upto = rmax;
  };

  const int64_t close_slack = std::max<int64_t>(1, token_cap / 200);
  std::vector<int32_t> grow(vmax + 1);  // candidate unit counts of a growing move: grow[0 .. n_grow)
  std::vector<double> grow_weight(vmax + 1);
  int64_t vit = 0, tok = 0;  // the open group's units and tokens
  // Units and tokens of the unused samples: a group aims at their ratio (its fair share of tokens), so
  // token-rich samples are not used up by the first groups, leaving the last ones short.
  int64_t pool_units = 0, pool_tokens = 0;
  for (int64_t i : order) {
    pool_units += units(i);
    pool_tokens += len.tokens[i];
  }
  auto add = [&](int32_t v, int64_t value) {  // value: the token-count index a look-up of bucket v gave
    Bucket& b = buckets[v];
    int64_t i = b.take(value);
    if (b.extremes_changed) bounds_upto = -1;
    drain[v] = b.drain_weight();
    vit += v;
    tok += b.values[value];
    pool_units -= v;
    pool_tokens -= b.values[value];
    out.indices.push_back(i);
  };

  while (pool_units > 0) {
    vit = tok = 0;
    const int64_t target = std::min<int64_t>(token_cap, unit_cap * pool_tokens / pool_units);
    // Seed: a uniform unused sample of a bucket drawn by drain weight, so buckets that growing moves rarely
    // reach (large samples, once a group is half full) are started from and do not pile up at the end.
    // (On a Qwen-style table: fills 0.960 / 0.959 against 0.955 / 0.954 with a uniform seed sample.)
    double r = std::accumulate(drain.begin(), drain.end(), 0.0) * (static_cast<double>(rng.next() >> 11) * 0x1.0p-53);
    int32_t seed_v = vmax;
    while (seed_v > 1 && (drain[seed_v] == 0 || (r -= drain[seed_v]) >= 0)) --seed_v;
    while (buckets[seed_v].left == 0) ++seed_v;  // rounding left r >= 0 down to bucket 1
    Bucket& sb = buckets[seed_v];
    add(seed_v, sb.kth_value(1 + static_cast<int64_t>(rng.below(static_cast<uint64_t>(sb.left)))));

    while (vit < unit_cap) {
      const int64_t rv = unit_cap - vit, rt = token_cap - tok, aim_left = target - tok;
      const bool can_close = rv <= vmax && buckets[rv].left > 0;
      const int64_t aim_value = can_close ? buckets[rv].largest_at_most(std::min(rt, aim_left + close_slack)) : -1;
      if (aim_value >= 0 && buckets[rv].values[aim_value] >= aim_left - close_slack) {
        add(static_cast<int32_t>(rv), aim_value);
        break;
      }
      fill_bounds(rv - 1);
      size_t n_grow = 0;
      double weight = 0;
      for (int32_t v = 1; v <= std::min<int64_t>(rv - 1, vmax); ++v) {
        const int64_t rest = rv - v;
        if (drain[v] == 0 || lo[rest] == kNone) continue;
        // The pick must leave tokens that the remaining units can use exactly.
        if (bucket_min[v] > rt - lo[rest] || bucket_max[v] < rt - hi[rest]) continue;
        grow[n_grow] = v;
        grow_weight[n_grow++] = drain[v];
        weight += drain[v];
      }
      int64_t pick_value = -1;
      int32_t pick_v = 0;
      while (pick_value < 0 && n_grow > 0) {
        double r = weight * (static_cast<double>(rng.next() >> 11) * 0x1.0p-53);
        size_t c = n_grow - 1;
        for (size_t k = 0; k < n_grow; ++k) {
          if ((r -= grow_weight[k]) < 0) {
            c = k;
            break;
          }
        }
        pick_v = grow[c];
        Bucket& b = buckets[pick_v];
        const int64_t rest = rv - pick_v, t_lo = rt - hi[rest], t_hi = rt - lo[rest];
        pick_value = b.uniform_between(std::max<int64_t>(t_lo, 1), t_hi, rng);
        if (pick_value < 0) {  // no sample of this unit count fits the window: drop the candidate
          weight -= grow_weight[c];
          std::copy(grow.begin() + c + 1, grow.begin() + n_grow, grow.begin() + c);
          std::copy(grow_weight.begin() + c + 1, grow_weight.begin() + n_grow, grow_weight.begin() + c);
          --n_grow;
        }
      }
      if (pick_value >= 0) {
        add(pick_v, pick_value);
        continue;
      }
      // Nothing grows the group exactly: close it off the aim with the largest sample that still fits.
      const int64_t close_value = can_close ? buckets[rv].largest_at_most(rt) : -1;
      if (close_value >= 0) {
        add(static_cast<int32_t>(rv), close_value);
        break;
      } else {
        // No exact fill is possible (a token-heavy sample, or the pool's end): add what still fits,
        // most units first, so the group ends as full as it can.
        int32_t v = static_cast<int32_t>(std::min<int64_t>(rv, vmax));
        while (v > 0 && (buckets[v].left == 0 || bucket_min[v] > rt)) --v;
        if (v == 0) break;
        add(v, buckets[v].uniform_between(1, rt, rng));
      }
    }
    out.close_group();
  }
  return out;
}

}  // namespace omnibal
