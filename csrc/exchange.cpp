// Sample exchange between the groups of one step: evens the DP ranks' modelled time within the caps.
//
// A rank's load is the summed modelled cost of its samples (the time model is additive over samples; its fixed
// cost per micro-batch is the same on every rank). One sweep sorts the ranks by load, heaviest first, and pairs
// each rank of the heavy half with the lightest unpaired rank (or, when no exchange is allowed there, one of
// the next kPartnerTries lighter ones). For a pair (h, l) with gap = load[h] - load[l] it takes the best of
//   - a move: a sample of one of h's groups (not its last) into one of l's groups,
//   - a swap: a sample of h's group against a lighter one of l's group,
// whose cost shift d lies in (0, gap), the one nearest gap / 2, keeping every receiving group within vit_cap
// and token_cap. Both loads then stay below the old load[h], and the sum of squared loads falls by
// 2 d (gap - d) > 0, so no exchange is ever undone and sweeps end: at the first sweep without an exchange, or
// after `sweeps`.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "grouping.h"

namespace omnibal {

namespace {

constexpr int kPartnerTries = 4;

struct Group {
  std::vector<int64_t> samples;
  int64_t vit = 0;
  int64_t tokens = 0;
};

struct Exchange {
  double score = INFINITY;  // |gap - 2 d|: 0 when the pair ends even
  double shift = 0;         // d: cost moved from the heavy rank to the light one
  Group* from = nullptr;
  Group* to = nullptr;
  size_t given = 0;  // position in from->samples
  int64_t taken = -1;  // position in to->samples (-1: a move)
};

class StepExchange {
 public:
  StepExchange(const Lengths& len, const double* cost, int32_t vit_cap, int32_t token_cap)
      : len_(len), cost_(cost), vit_cap_(vit_cap), token_cap_(token_cap) {}

  // Best exchange from the groups of `heavy` into those of `light` (each `micro_batches` long) for a gap.
  Exchange best(Group* heavy, Group* light, int32_t micro_batches, double gap) const {
    Exchange e;
    for (Group* from = heavy; from != heavy + micro_batches; ++from) {
      for (Group* to = light; to != light + micro_batches; ++to) {
        for (size_t a = 0; a < from->samples.size(); ++a) {
          const int64_t i = from->samples[a];
          const double ci = cost_[i];
          if (from->samples.size() > 1 && fits(*to, len_.vit[i], len_.tokens[i])) consider(e, ci, gap, from, to, a, -1);
          for (size_t b = 0; b < to->samples.size(); ++b) {
            const int64_t k = to->samples[b];
            const int64_t dv = len_.vit[i] - len_.vit[k];
            const int64_t dt = len_.tokens[i] - len_.tokens[k];
            if (fits(*to, dv, dt) && fits(*from, -dv, -dt))
              consider(e, ci - cost_[k], gap, from, to, a, static_cast<int64_t>(b));
          }
        }
      }
    }
    return e;
  }

  void apply(const Exchange& e) const {
    const int64_t i = e.from->samples[e.given];
    if (e.taken < 0) {
      e.from->samples.erase(e.from->samples.begin() + static_cast<std::ptrdiff_t>(e.given));
      e.to->samples.push_back(i);
      shift(*e.from, *e.to, i);
      return;
    }
    const int64_t k = e.to->samples[static_cast<size_t>(e.taken)];
    e.from->samples[e.given] = k;
    e.to->samples[static_cast<size_t>(e.taken)] = i;
    shift(*e.from, *e.to, i);
    shift(*e.to, *e.from, k);
  }

 private:
  bool fits(const Group& g, int64_t more_vit, int64_t more_tokens) const {
    return g.vit + more_vit <= vit_cap_ && g.tokens + more_tokens <= token_cap_;
  }

  static void consider(Exchange& e, double d, double gap, Group* from, Group* to, size_t given, int64_t taken) {
    if (!(d > 0 && d < gap)) return;
    const double score = std::fabs(gap - 2 * d);
    if (score < e.score) e = Exchange{score, d, from, to, given, taken};
  }

  void shift(Group& from, Group& to, int64_t i) const {
    from.vit -= len_.vit[i];
    from.tokens -= len_.tokens[i];
    to.vit += len_.vit[i];
    to.tokens += len_.tokens[i];
  }

  const Lengths& len_;
  const double* cost_;
  int32_t vit_cap_;
  int32_t token_cap_;
};

}  // namespace

Groups exchange_samples(const Lengths& len, const double* cost, const CsrGroups& grouping, const int64_t* step_groups,
                        int64_t steps, int32_t dp, int32_t micro_batches, int32_t vit_cap, int32_t token_cap,
                        int sweeps) {
  const int64_t* indices = grouping.indices;
  const int64_t* offsets = grouping.offsets;
  const int64_t n_groups = grouping.groups;
  const int64_t per_step = static_cast<int64_t>(dp) * micro_batches;
  if (dp < 1 || micro_batches < 1 || steps < 0)
    throw std::invalid_argument("exchange_samples: dp, micro_batches must be >= 1 and steps >= 0");
  std::vector<int64_t> placed_at(static_cast<size_t>(n_groups), -1);  // start of the group's samples in `placed`
  std::vector<int64_t> placed_size(static_cast<size_t>(n_groups), 0);
  std::vector<int64_t> placed;
  placed.reserve(static_cast<size_t>(offsets[n_groups]));
  const StepExchange exchange(len, cost, vit_cap, token_cap);
  std::vector<Group> groups(static_cast<size_t>(per_step));
  std::vector<double> load(static_cast<size_t>(dp));
  std::vector<int32_t> order(static_cast<size_t>(dp));
  std::vector<char> paired(static_cast<size_t>(dp));

  for (int64_t s = 0; s < steps * per_step; s += per_step) {
    std::fill(load.begin(), load.end(), 0.0);
    for (int64_t slot = 0; slot < per_step; ++slot) {
      const int64_t g = step_groups[s + slot];
      if (g < 0 || g >= n_groups || placed_at[g] != -1)
        throw std::invalid_argument("exchange_samples: group " + std::to_string(g) + " is out of range or in two steps");
      placed_at[g] = -2;  // claimed by this step; set to its start below
      Group& grp = groups[static_cast<size_t>(slot)];
      grp.samples.assign(indices + offsets[g], indices + offsets[g + 1]);
      grp.vit = grp.tokens = 0;
      for (int64_t i : grp.samples) {
        grp.vit += len.vit[i];
        grp.tokens += len.tokens[i];
        load[static_cast<size_t>(slot / micro_batches)] += cost[i];
      }
    }
    for (int sweep = 0; sweep < sweeps; ++sweep) {
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return load[a] > load[b]; });
      std::fill(paired.begin(), paired.end(), 0);
      bool changed = false;
      for (int32_t p = 0; p < dp / 2; ++p) {
        const int32_t h = order[p];
        if (paired[h]) continue;
        int tries = 0;
        for (int32_t q = dp - 1; q > p && tries < kPartnerTries; --q) {
          const int32_t l = order[q];
          if (paired[l]) continue;
          ++tries;
          const double gap = load[h] - load[l];
          if (!(gap > 0)) break;
          const Exchange e = exchange.best(&groups[static_cast<size_t>(h) * micro_batches],
                                           &groups[static_cast<size_t>(l) * micro_batches], micro_batches, gap);
          if (e.from == nullptr) continue;
          exchange.apply(e);
          load[h] -= e.shift;
          load[l] += e.shift;
          paired[h] = paired[l] = 1;
          changed = true;
          break;
        }
      }
      if (!changed) break;
    }
    for (int64_t slot = 0; slot < per_step; ++slot) {
      const int64_t g = step_groups[s + slot];
      const Group& grp = groups[static_cast<size_t>(slot)];
      placed_at[g] = static_cast<int64_t>(placed.size());
      placed_size[g] = static_cast<int64_t>(grp.samples.size());
      placed.insert(placed.end(), grp.samples.begin(), grp.samples.end());
    }
  }

  Groups out;
  out.indices.reserve(static_cast<size_t>(offsets[n_groups]));
  for (int64_t g = 0; g < n_groups; ++g) {
    if (placed_at[g] >= 0)
      out.indices.insert(out.indices.end(), placed.begin() + placed_at[g], placed.begin() + placed_at[g] + placed_size[g]);
    else
      out.indices.insert(out.indices.end(), indices + offsets[g], indices + offsets[g + 1]);
    out.close_group();
  }
  return out;
}

}  // namespace omnibal
