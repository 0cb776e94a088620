// Shared types of the grouping algorithms: input columns, oversize policy and CSR output.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace omnibal {

enum class Oversize { kError, kSolo };

// Groups in compressed form: group g holds indices[offsets[g] .. offsets[g + 1]).
struct Groups {
  std::vector<int64_t> indices;
  std::vector<int64_t> offsets{0};
  int64_t oversize = 0;  // samples placed alone because they exceed a cap (policy kSolo)

  void close_group() { offsets.push_back(static_cast<int64_t>(indices.size())); }
  size_t size() const { return offsets.size() - 1; }
};

struct Lengths {
  const int32_t* vit;
  const int32_t* tokens;
  int64_t n;
};

// Thrown when a sample exceeds a cap under Oversize::kError; mapped to omnibal_pl.BalanceError.
struct OversizeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Splits samples into those within both caps (returned) and oversize ones, which become solo
// groups in `out` (kSolo) or raise OversizeError naming the first one (kError).
std::vector<int64_t> split_oversize(const Lengths& len, int32_t vit_cap, int32_t token_cap, Oversize policy,
                                    Groups& out);

Groups isf(const Lengths& len, int32_t vit_cap, int32_t token_cap, int64_t token_threshold, int iterations,
           uint64_t seed, Oversize policy);

// Fills groups to vit_cap in units of vit_quantum vision counts (1: exact tiles) and close to token_cap.
Groups balanced(const Lengths& len, int32_t vit_cap, int32_t token_cap, int32_t vit_quantum, uint64_t seed,
                Oversize policy);

// Groups as CSR arrays held elsewhere (numpy): group g is indices[offsets[g] .. offsets[g + 1]).
struct CsrGroups {
  const int64_t* indices;
  const int64_t* offsets;
  int64_t groups;
};

// Exchanges samples between the groups of each step (step_groups: [steps][dp][micro_batches] group ids, each
// group in at most one step) so the DP ranks' summed `cost` (per sample) evens out, every changed group kept
// within vit_cap and token_cap; at most `sweeps` sweeps per step. Returns all groups, same ids, same order.
Groups exchange_samples(const Lengths& len, const double* cost, const CsrGroups& grouping, const int64_t* step_groups,
                        int64_t steps, int32_t dp, int32_t micro_batches, int32_t vit_cap, int32_t token_cap,
                        int sweeps);

// LLaMA-Factory's packing (greedy knapsack on tokens up to token_cap); tiles are not capped.
Groups greedy_knapsack(const Lengths& len, int32_t token_cap, uint64_t seed, Oversize policy);

}  // namespace omnibal
